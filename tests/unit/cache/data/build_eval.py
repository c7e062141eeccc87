"""Writes cache_eval.jsonl: the labelled pairs the cache's semantic tier is evaluated on.

Each pair says whether a cached answer to `a` may be served for `b` (`label`). Kinds:
paraphrase (true), and traps (false): negation, entity, number, date, polarity, unit,
unrelated, scope (same text, another tenant/user/model/system prompt) and multiturn (same
follow-up text after a different conversation). Run: python -m tests.unit.cache.data.build_eval
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PARAPHRASES = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("How do I reset my password?", "how do i reset my password"),
    ("How do I reset my password?", "What's the way to reset my password?"),
    ("I forgot my password, what should I do?", "I forgot my password. What should I do?"),
    ("How do I change my email address?", "How can I change my email address?"),
    ("How can I update my email address?", "How do I update my email address?"),
    ("What are your opening hours?", "What are your opening hours"),
    ("What are your opening hours?", "What are the opening hours?"),
    ("When are you open?", "When are you guys open?"),
    ("Where is my order?", "Where's my order?"),
    ("Where is my order?", "where is my order??"),
    ("How do I track my order?", "How can I track my order?"),
    ("How long does shipping take?", "How long does the shipping take?"),
    ("How long does delivery take?", "How long will delivery take?"),
    ("Do you ship internationally?", "Do you offer international shipping?"),
    ("Do you ship internationally?", "Do you ship abroad?"),
    ("What is your return policy?", "What's your return policy?"),
    ("What is your return policy?", "Can you tell me your return policy?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?"),
    ("How do I cancel my subscription?", "How do I cancel my subscription please?"),
    ("Can I get a refund?", "Is it possible to get a refund?"),
    ("Can I get a refund?", "Could I get a refund?"),
    ("How do I contact customer support?", "How can I contact customer support?"),
    ("How do I contact customer support?", "How do I get in touch with customer support?"),
    ("What payment methods do you accept?", "Which payment methods do you accept?"),
    ("What payment methods do you accept?", "What payment methods are accepted?"),
    ("Do you accept PayPal?", "Can I pay with PayPal?"),
    ("Do you accept PayPal?", "Is PayPal accepted?"),
    ("How do I delete my account?", "How can I delete my account?"),
    ("How do I delete my account?", "How do I delete my account permanently?"),
    ("Is my data encrypted?", "Is my data stored encrypted?"),
    ("How do I enable two-factor authentication?", "How can I enable two-factor authentication?"),
    ("How do I enable two-factor authentication?", "How do I turn on two-factor authentication?"),
    ("What is the capital of France?", "What's the capital of France?"),
    ("What is the capital of France?", "what is the capital city of France?"),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
    ("Who wrote Pride and Prejudice?", "Who wrote the novel Pride and Prejudice?"),
    ("How tall is Mount Everest?", "What is the height of Mount Everest?"),
    ("How tall is Mount Everest?", "How high is Mount Everest?"),
    ("What does HTTP stand for?", "What does the acronym HTTP stand for?"),
    ("What does HTTP stand for?", "What is HTTP short for?"),
    ("How do I install Python on Windows?", "How can I install Python on Windows?"),
    ("How do I install Python on Windows?", "What's the way to install Python on Windows?"),
    ("How do I reverse a list in Python?", "How can I reverse a list in Python?"),
    ("How do I reverse a list in Python?", "How to reverse a list in Python?"),
    ("How do I read a file in Python?", "How can I read a file in Python?"),
    ("How do I read a CSV file in Python?", "How to read a CSV file with Python?"),
    ("What is a REST API?", "What's a REST API?"),
    ("What is a REST API?", "Can you explain what a REST API is?"),
    ("What is Docker used for?", "What is Docker for?"),
    ("What is Kubernetes?", "What's Kubernetes?"),
    ("How do I undo the last commit in Git?", "How can I undo the last commit in Git?"),
    ("How do I undo the last commit in Git?", "How to undo the last Git commit?"),
    ("How do I merge two branches in Git?", "How can I merge two branches in Git?"),
    ("What is machine learning?", "What's machine learning?"),
    ("What is machine learning?", "Can you explain what machine learning is?"),
    ("How does photosynthesis work?", "How does photosynthesis work exactly?"),
    ("Why is the sky blue?", "Why is the sky blue in color?"),
    ("Why is the sky blue?", "why is the sky blue"),
    ("How many continents are there?", "How many continents are there in the world?"),
    ("How do I make pancakes?", "How can I make pancakes?"),
    ("What is a good recipe for pancakes?", "What's a good pancake recipe?"),
    ("How do I boil an egg?", "How can I boil an egg?"),
    ("How do I update the app?", "How can I update the app?"),
    ("How do I update the app?", "How do I update this app?"),
    ("The app keeps crashing, what can I do?", "The app keeps crashing. What can I do?"),
    ("How do I change the language of the app?", "How can I change the app language?"),
    ("How do I upgrade my plan?", "How can I upgrade my plan?"),
    ("Where can I find my invoices?", "Where do I find my invoices?"),
    ("Where can I find my invoices?", "Where can I see my invoices?"),
    ("How do I add a team member?", "How can I add a team member?"),
    ("How do I add a team member?", "How do I add a new team member?"),
    ("Can I change my username?", "Is it possible to change my username?"),
    ("Can I change my username?", "Can I change my user name?"),
    ("How do I export my data?", "How can I export my data?"),
    ("How do I export my data?", "How do I export all my data?"),
    (
        "What is the difference between a list and a tuple in Python?",
        "What's the difference between a list and a tuple in Python?",
    ),
    ("Explain the difference between TCP and UDP", "What is the difference between TCP and UDP?"),
    ("Summarize the plot of Hamlet", "Summarise the plot of Hamlet"),
    ("Give me a summary of Hamlet", "Give me a short summary of Hamlet"),
    ("Translate 'good morning' into Spanish", 'Translate "good morning" into Spanish'),
    ("How do I center a div in CSS?", "How can I center a div in CSS?"),
    ("How do I center a div in CSS?", "How to center a div with CSS?"),
    ("How do I sort a dictionary by value in Python?", "How can I sort a dictionary by value in Python?"),
    ("What is the speed of light?", "What's the speed of light?"),
    ("What causes earthquakes?", "What causes an earthquake?"),
    ("How do vaccines work?", "How do vaccines actually work?"),
    ("What is inflation?", "What's inflation?"),
    ("What is inflation?", "Can you explain what inflation is?"),
    ("How do I write a cover letter?", "How should I write a cover letter?"),
    ("How do I write a cover letter?", "How do I write a good cover letter?"),
    ("Is the gym open on Sunday?", "Is the gym open on Sundays?"),
    ("Do you have parking?", "Do you have parking available?"),
    ("Do you have vegetarian options?", "Do you have any vegetarian options?"),
    ("Are pets allowed?", "Are pets allowed here?"),
    ("Is there free Wi-Fi?", "Is there free WiFi?"),
    ("How do I connect to the Wi-Fi?", "How can I connect to the Wi-Fi?"),
    ("What is the check-in time?", "What time is check-in?"),
    ("What is the check-out time?", "What time is check-out?"),
    ("How do I book an appointment?", "How can I book an appointment?"),
    ("How do I reschedule my appointment?", "How can I reschedule my appointment?"),
    ("Can I pay in installments?", "Is it possible to pay in installments?"),
    ("Do you offer student discounts?", "Do you have student discounts?"),
    ("How do I apply a discount code?", "How can I apply a discount code?"),
    ("How do I apply a promo code?", "Where do I enter a promo code?"),
    ("My package arrived damaged, what should I do?", "My package arrived damaged. What do I do?"),
    ("I was charged twice", "I was charged twice for my order"),
    ("Why was I charged twice?", "Why did I get charged twice?"),
    ("How do I log out of all devices?", "How can I log out of all devices?"),
    ("How do I change my profile picture?", "How can I change my profile picture?"),
    ("How do I turn off notifications?", "How can I turn off notifications?"),
    ("How do I turn off notifications?", "How do I switch off notifications?"),
    ("Is the service down?", "Is the service down right now?"),
    ("What is the meaning of life?", "What's the meaning of life?"),
    ("Tell me a joke", "Tell me a joke please"),
    ("Recommend a good book", "Can you recommend a good book?"),
    ("What is the best way to learn Spanish?", "What's the best way to learn Spanish?"),
    ("How can I improve my sleep?", "How do I improve my sleep?"),
    ("What are the symptoms of the flu?", "What are flu symptoms?"),
    ("How much water should I drink a day?", "How much water should I drink per day?"),
]

# (a, b, kind): b must not be served a's answer.
TRAPS = [
    # negation
    ("Can I return opened items?", "Can I not return opened items?", "negation"),
    ("Is the store open on Sunday?", "Is the store not open on Sunday?", "negation"),
    ("Do you ship to Canada?", "Don't you ship to Canada?", "negation"),
    ("Should I take ibuprofen with food?", "Should I not take ibuprofen with food?", "negation"),
    ("Why does my code work?", "Why doesn't my code work?", "negation"),
    ("Why is my payment going through?", "Why is my payment not going through?", "negation"),
    ("I can log in to my account", "I can't log in to my account", "negation"),
    ("Is it safe to eat raw eggs?", "Is it never safe to eat raw eggs?", "negation"),
    ("Can I use the app with an account?", "Can I use the app without an account?", "negation"),
    ("Does the plan include support?", "Does the plan not include support?", "negation"),
    ("Is there a fee for cancelling?", "Is there no fee for cancelling?", "negation"),
    ("What happens if I pay my invoice?", "What happens if I don't pay my invoice?", "negation"),
    ("My card was charged", "My card was not charged", "negation"),
    ("Why is the email arriving?", "Why is the email never arriving?", "negation"),
    ("Is smoking allowed in the rooms?", "Is smoking not allowed in the rooms?", "negation"),
    ("Do I need a visa for Japan?", "Do I not need a visa for Japan?", "negation"),
    ("Does this laptop have a touchscreen?", "Does this laptop have no touchscreen?", "negation"),
    ("Can children attend the event?", "Can children not attend the event?", "negation"),
    ("Is the update mandatory?", "Is the update not mandatory?", "negation"),
    ("Should I water succulents daily?", "Should I never water succulents daily?", "negation"),
    # polarity (opposites)
    ("Is the store open on Sunday?", "Is the store closed on Sunday?", "polarity"),
    ("How do I enable dark mode?", "How do I disable dark mode?", "polarity"),
    ("How do I add a user to the team?", "How do I remove a user from the team?", "polarity"),
    ("How do I turn on notifications?", "How do I turn off notifications?", "polarity"),
    ("How do I start my subscription?", "How do I stop my subscription?", "polarity"),
    ("How do I import contacts?", "How do I export contacts?", "polarity"),
    ("How do I upload a file?", "How do I download a file?", "polarity"),
    ("Should I eat before running?", "Should I eat after running?", "polarity"),
    ("How do I increase the font size?", "How do I decrease the font size?", "polarity"),
    ("What is the cheapest plan?", "What is the most expensive plan?", "polarity"),
    ("How do I encrypt a file?", "How do I decrypt a file?", "polarity"),
    ("How do I log in?", "How do I log out?", "polarity"),
    ("How do I lock my account?", "How do I unlock my account?", "polarity"),
    ("How do I subscribe to the newsletter?", "How do I unsubscribe from the newsletter?", "polarity"),
    ("What is the maximum file size?", "What is the minimum file size?", "polarity"),
    ("How do I install the app?", "How do I uninstall the app?", "polarity"),
    ("How do I buy shares?", "How do I sell shares?", "polarity"),
    ("Is this statement true?", "Is this statement false?", "polarity"),
    ("How do I make my repo public?", "How do I make my repo private?", "polarity"),
    ("What is the fastest route to the airport?", "What is the slowest route to the airport?", "polarity"),
    ("How do I upgrade my plan?", "How do I downgrade my plan?", "polarity"),
    ("Which is the best seat on the plane?", "Which is the worst seat on the plane?", "polarity"),
    ("How do I send money?", "How do I receive money?", "polarity"),
    ("How do I approve a request?", "How do I reject a request?", "polarity"),
    ("How do I activate my card?", "How do I deactivate my card?", "polarity"),
    # entities
    ("What is the capital of France?", "What is the capital of Germany?", "entity"),
    ("Do you ship to Canada?", "Do you ship to Mexico?", "entity"),
    ("How do I install Python on Windows?", "How do I install Python on Linux?", "entity"),
    ("How do I reverse a list in Python?", "How do I reverse a list in JavaScript?", "entity"),
    ("Who wrote Hamlet?", "Who wrote Macbeth?", "entity"),
    ("Who is the CEO of Apple?", "Who is the CEO of Google?", "entity"),
    ("How do I connect to AWS S3?", "How do I connect to Azure Blob Storage?", "entity"),
    ("What is the population of Tokyo?", "What is the population of Osaka?", "entity"),
    ("Flights from Paris to London", "Flights from London to Paris", "entity"),
    ("Is Paris bigger than London?", "Is London bigger than Paris?", "entity"),
    ("Convert EUR to USD", "Convert USD to EUR", "entity"),
    ("Do you accept PayPal?", "Do you accept Venmo?", "entity"),
    ("How do I set up Gmail on my iPhone?", "How do I set up Outlook on my iPhone?", "entity"),
    ("How do I set up Gmail on my iPhone?", "How do I set up Gmail on my Android?", "entity"),
    ("What's the weather in Berlin?", "What's the weather in Munich?", "entity"),
    ("How do I migrate from MySQL to PostgreSQL?", "How do I migrate from PostgreSQL to MySQL?", "entity"),
    ("What time does the Louvre open?", "What time does the Prado open?", "entity"),
    ("Tell me about the Roman Empire", "Tell me about the Ottoman Empire", "entity"),
    ("Is GPT-4 better than GPT-3?", "Is GPT-3 better than GPT-4?", "entity"),
    ("What are the side effects of Aspirin?", "What are the side effects of Tylenol?", "entity"),
    ("How do I cancel my Netflix subscription?", "How do I cancel my Spotify subscription?", "entity"),
    ("When was Abraham Lincoln born?", "When was George Washington born?", "entity"),
    ("Translate hello into French", "Translate hello into Italian", "entity"),
    ("How do I use React hooks?", "How do I use Vue hooks?", "entity"),
    ("What does the error ECONNREFUSED mean?", "What does the error ETIMEDOUT mean?", "entity"),
    ("How do I open file config.yaml?", "How do I open file settings.yaml?", "entity"),
    ("Is Sarah on the team?", "Is John on the team?", "entity"),
    ("What is the price of the Pro plan?", "What is the price of the Team plan?", "entity"),
    ("How do I get to Central Park?", "How do I get to Times Square?", "entity"),
    ("How do I set up an account with Chase?", "How do I set up an account with Citibank?", "entity"),
    # numbers
    ("Can I book a table for 4 people?", "Can I book a table for 5 people?", "number"),
    ("What is 15% of 200?", "What is 20% of 200?", "number"),
    ("What is 2 plus 2?", "What is 2 plus 3?", "number"),
    ("Convert 100 miles to km", "Convert 10 miles to km", "number"),
    ("Is a 3 bedroom apartment available?", "Is a 2 bedroom apartment available?", "number"),
    ("Do you have size 9 shoes?", "Do you have size 10 shoes?", "number"),
    ("Where is gate 12?", "Where is gate 21?", "number"),
    ("How much is the iPhone 14?", "How much is the iPhone 15?", "number"),
    ("What was the score of game 3?", "What was the score of game 4?", "number"),
    ("I want to order two pizzas", "I want to order three pizzas", "number"),
    ("Can I get a room for one night?", "Can I get a room for two nights?", "number"),
    ("Explain chapter 5 of the book", "Explain chapter 6 of the book", "number"),
    ("What's the first step to set up the router?", "What's the second step to set up the router?", "number"),
    ("My order number is 12345, where is it?", "My order number is 12346, where is it?", "number"),
    ("Is bus 42 running?", "Is bus 24 running?", "number"),
    ("How much is shipping for orders over $50?", "How much is shipping for orders over $100?", "number"),
    ("What's the interest on a 30 year mortgage?", "What's the interest on a 15 year mortgage?", "number"),
    ("Is Python 3.11 supported?", "Is Python 3.12 supported?", "number"),
    ("Can I bring 2 bags on the flight?", "Can I bring 3 bags on the flight?", "number"),
    ("What happens at level 10 in the game?", "What happens at level 11 in the game?", "number"),
    ("Book a flight for 1 adult", "Book a flight for 2 adults", "number"),
    ("What is the square root of 144?", "What is the square root of 169?", "number"),
    ("How many calories are in 100 grams of rice?", "How many calories are in 200 grams of rice?", "number"),
    ("Set an alarm for 7", "Set an alarm for 8", "number"),
    ("Is room 204 available?", "Is room 402 available?", "number"),
    # dates and times
    ("Is the store open on Sunday?", "Is the store open on Monday?", "date"),
    ("What's the weather today?", "What's the weather tomorrow?", "date"),
    ("Are you open on Christmas?", "Are you open on Easter?", "date"),
    ("Can I book a table for Friday?", "Can I book a table for Saturday?", "date"),
    ("What happened in 1969?", "What happened in 1968?", "date"),
    ("Is the office open in August?", "Is the office open in December?", "date"),
    ("What are the sales figures for last month?", "What are the sales figures for next month?", "date"),
    ("Can I check in at 2 pm?", "Can I check in at 2 am?", "date"),
    ("Is the museum open in the morning?", "Is the museum open in the evening?", "date"),
    ("Schedule the meeting for March 3", "Schedule the meeting for March 4", "date"),
    ("Will it rain this weekend?", "Will it rain next weekend?", "date"),
    ("Is the pool open in summer?", "Is the pool open in winter?", "date"),
    ("What did I spend yesterday?", "What did I spend today?", "date"),
    ("Is delivery available on Saturdays?", "Is delivery available on Sundays?", "date"),
    ("Who won the World Cup in 2018?", "Who won the World Cup in 2022?", "date"),
    ("Do you deliver at night?", "Do you deliver in the afternoon?", "date"),
    ("What is on the calendar for January?", "What is on the calendar for February?", "date"),
    ("Is the bank open on weekdays?", "Is the bank open on weekends?", "date"),
    # units
    ("Convert 10 miles to km", "Convert 10 km to miles", "unit"),
    ("How much is 100 USD in EUR?", "How much is 100 EUR in USD?", "unit"),
    ("Is 30 degrees Celsius hot?", "Is 30 degrees Fahrenheit hot?", "unit"),
    ("How many pounds is 5 kg?", "How many kg is 5 pounds?", "unit"),
    # unrelated but topical
    ("How do I reset my password?", "How do I change my username?", "unrelated"),
    ("What are your opening hours?", "Where are you located?", "unrelated"),
    ("How long does shipping take?", "How much does shipping cost?", "unrelated"),
    ("What is your return policy?", "What is your privacy policy?", "unrelated"),
    ("How do I cancel my subscription?", "How do I pause my subscription?", "unrelated"),
    ("Can I get a refund?", "Can I get an invoice?", "unrelated"),
    ("Do you have parking?", "Do you have a gym?", "unrelated"),
    ("How do I make pancakes?", "How do I make waffles?", "unrelated"),
    ("How do I boil an egg?", "How do I poach an egg?", "unrelated"),
    ("What causes earthquakes?", "What causes tsunamis?", "unrelated"),
    ("How do I feed my cat?", "How do I feed my dog?", "unrelated"),
    ("What is a good name for a cat?", "What is a good name for a dog?", "unrelated"),
    ("How do I sort a list in Python?", "How do I shuffle a list in Python?", "unrelated"),
    ("How do I read a file in Python?", "How do I write a file in Python?", "unrelated"),
    ("Where can I find my invoices?", "Where can I find my receipts?", "unrelated"),
    ("What is the check-in time?", "What is the check-out time?", "unrelated"),
    ("How do I change my email address?", "How do I change my phone number?", "unrelated"),
    ("What are the symptoms of the flu?", "What are the symptoms of a cold?", "unrelated"),
    ("What is machine learning?", "What is deep learning?", "unrelated"),
    ("How do I add a team member?", "How do I add a team admin?", "unrelated"),
]

# Held out: written after the guards were tuned; the benchmark reports them separately so the
# numbers on the tuned pairs can be judged (bench/cache_eval.py keeps the first run's numbers).
HOLDOUT_PARAPHRASES = [
    ("How do I change my billing address?", "How can I change my billing address?"),
    ("How do I get a copy of my receipt?", "How can I get a copy of my receipt?"),
    ("Can I change my flight?", "Is it possible to change my flight?"),
    ("How do I report a bug?", "How can I report a bug?"),
    ("Where do I download the mobile app?", "Where can I download the mobile app?"),
    ("Do you have a loyalty program?", "Do you have a loyalty programme?"),
    ("How do I verify my email?", "How can I verify my email address?"),
    ("What is your phone number?", "What's your phone number?"),
    ("Can I transfer my license to another computer?", "Can I move my license to another computer?"),
    ("How do I share a document with my team?", "How can I share a document with my team?"),
    ("Is there a mobile version?", "Is there a mobile version available?"),
    ("How do I rename a file in Linux?", "How can I rename a file in Linux?"),
    ("What is the boiling point of water?", "What's the boiling point of water?"),
    ("How do I print a PDF?", "How can I print a PDF?"),
    ("Where is the nearest ATM?", "Where's the nearest ATM?"),
    ("How do I clear my browser cache?", "How can I clear my browser cache?"),
    ("What is a black hole?", "What's a black hole?"),
    ("How do I remove a virus from my computer?", "How can I remove a virus from my computer?"),
    ("Can you explain blockchain?", "Can you explain what blockchain is?"),
    ("How do I make cold brew coffee?", "How can I make cold brew coffee?"),
    ("Why is my internet slow?", "Why is my internet connection slow?"),
    ("How do I set up a VPN?", "How can I set up a VPN?"),
    ("What should I pack for a beach holiday?", "What should I bring for a beach holiday?"),
    ("How do I get rid of hiccups?", "How can I get rid of hiccups?"),
    ("What is the tallest building in the world?", "What's the tallest building in the world?"),
    ("Can I bring food on the plane?", "Am I allowed to bring food on the plane?"),
    ("How do I merge PDF files?", "How can I merge PDF files?"),
    ("What is your warranty policy?", "What's your warranty policy?"),
    ("How do I join a meeting?", "How can I join a meeting?"),
    ("How do I stop my screen from rotating?", "How can I stop my screen from rotating?"),
]

HOLDOUT_TRAPS = [
    ("Can I bring my dog to the hotel?", "Can I not bring my dog to the hotel?", "negation"),
    ("Is breakfast included?", "Is breakfast not included?", "negation"),
    ("Why does the printer work?", "Why doesn't the printer work?", "negation"),
    ("Is the parking free?", "Is the parking never free?", "negation"),
    ("Does the hotel have a pool?", "Does the hotel have no pool?", "negation"),
    ("Can I pay with cash?", "Can I pay without cash?", "negation"),
    ("Is the bridge open today?", "Is the bridge closed today?", "polarity"),
    ("How do I show hidden files?", "How do I hide hidden files?", "polarity"),
    ("How do I pause the download?", "How do I resume the download?", "polarity"),
    ("How do I raise my credit limit?", "How do I lower my credit limit?", "polarity"),
    ("Is it legal to drive at 17?", "Is it illegal to drive at 17?", "polarity"),
    ("How do I sign in to my account?", "How do I sign out of my account?", "polarity"),
    ("How do I accept the invitation?", "How do I decline the invitation?", "polarity"),
    ("How do I zoom in?", "How do I zoom out?", "polarity"),
    ("Which phone has the longest battery life?", "Which phone has the shortest battery life?", "polarity"),
    ("How do I mute the microphone?", "How do I unmute the microphone?", "polarity"),
    ("How do I connect to Zoom?", "How do I connect to Teams?", "entity"),
    ("What is the weather in Madrid?", "What is the weather in Lisbon?", "entity"),
    ("How do I install Docker on Ubuntu?", "How do I install Docker on Fedora?", "entity"),
    ("Who painted the Mona Lisa?", "Who painted the Sistine Chapel?", "entity"),
    ("Is Rust faster than Go?", "Is Go faster than Rust?", "entity"),
    (
        "How do I transfer money from Revolut to Wise?",
        "How do I transfer money from Wise to Revolut?",
        "entity",
    ),
    ("How far is Boston from New York?", "How far is Chicago from New York?", "entity"),
    ("What is the currency of Japan?", "What is the currency of China?", "entity"),
    ("Does the Model 3 have autopilot?", "Does the Model Y have autopilot?", "entity"),
    ("How do I use pandas groupby?", "How do I use polars groupby?", "entity"),
    (
        "Is there a bus from the airport to downtown at 5?",
        "Is there a bus from the airport to downtown at 6?",
        "number",
    ),
    ("Can 6 people fit in the car?", "Can 7 people fit in the car?", "number"),
    ("What is 12 times 12?", "What is 12 times 13?", "number"),
    ("Is a 50 Mbps connection enough?", "Is a 500 Mbps connection enough?", "number"),
    ("Can I return items after 14 days?", "Can I return items after 30 days?", "number"),
    ("Do you sell 4K monitors?", "Do you sell 8K monitors?", "number"),
    ("How long is a 10k run in miles?", "How long is a 5k run in miles?", "number"),
    ("Tickets for three adults please", "Tickets for four adults please", "number"),
    ("What is the speed limit on the A1?", "What is the speed limit on the A2?", "number"),
    ("Is the library open on Tuesday?", "Is the library open on Thursday?", "date"),
    ("What was the temperature yesterday?", "What will the temperature be tomorrow?", "date"),
    ("Are there fireworks in July?", "Are there fireworks in January?", "date"),
    ("Is the restaurant busy at lunch on weekends?", "Is the restaurant busy at lunch on weekdays?", "date"),
    ("What is the deadline for 2024 taxes?", "What is the deadline for 2025 taxes?", "date"),
    ("Do you open early in the morning?", "Do you open late in the evening?", "date"),
    ("How much is 50 GBP in USD?", "How much is 50 USD in GBP?", "unit"),
    ("Is 5 feet tall?", "Is 5 meters tall?", "unit"),
    ("How do I water a cactus?", "How do I water an orchid?", "unrelated"),
    ("How do I tie a tie?", "How do I tie a bow tie?", "unrelated"),
    ("How do I cancel my order?", "How do I track my order?", "unrelated"),
    ("What is the fee for late payment?", "What is the fee for early payment?", "unrelated"),
    ("Where can I park my bike?", "Where can I rent a bike?", "unrelated"),
    ("How do I clean my oven?", "How do I clean my fridge?", "unrelated"),
]

SCOPE = [
    ("How do I reset my password?", {"tenant": "other-tenant"}),
    ("What are your opening hours?", {"tenant": "other-tenant"}),
    ("What is my account balance?", {"user": "someone-else"}),
    ("Show me my last order", {"user": "someone-else"}),
    ("What is on my calendar today?", {"user": "someone-else"}),
    ("Summarize my unread emails", {"user": "someone-else"}),
    ("What is the capital of France?", {"model": "another-model"}),
    ("Write a haiku about autumn", {"model": "another-model"}),
    ("How do I cancel my subscription?", {"system": "You are the help desk of Globex Corp."}),
    ("What is your return policy?", {"system": "You are the help desk of Initech."}),
    ("Which plan should I choose?", {"system": "Answer in French."}),
    ("What is the price of the Pro plan?", {"namespace": "other-agent"}),
    ("How do I contact support?", {"namespace": "other-agent"}),
    ("Explain this error", {"tools": True}),
    ("What is the weather?", {"tools": True}),
]

MULTITURN = [
    (
        "How much is the cheapest one?",
        [("Do you sell running shoes?", "Yes, from Acme and Bolt.")],
        [("Do you sell hats?", "Yes, caps and beanies.")],
    ),
    (
        "What about the second one?",
        [("Compare plan A and plan B", "A is cheaper, B has support.")],
        [("Compare Python and Go", "Python is dynamic, Go is compiled.")],
    ),
    (
        "Can you make it shorter?",
        [("Write an email to my boss about leave", "Dear boss, ...")],
        [("Write a poem about the sea", "The sea, ...")],
    ),
    (
        "And in French?",
        [("Translate 'thank you' into Spanish", "Gracias")],
        [("Translate 'good night' into Spanish", "Buenas noches")],
    ),
    (
        "Why?",
        [("Is coffee bad for you?", "In moderation it is fine.")],
        [("Should I learn Rust?", "Yes, if you need systems work.")],
    ),
    (
        "How long does it take?",
        [("How do I renew my passport?", "Fill form DS-82.")],
        [("How do I cook rice?", "Boil water, add rice.")],
    ),
    (
        "Is it open now?",
        [("Where is the nearest pharmacy?", "On Main Street.")],
        [("Where is the nearest bank?", "On 5th Avenue.")],
    ),
    (
        "How much does it cost?",
        [("Tell me about the Pro plan", "Pro has 10 seats.")],
        [("Tell me about the Team plan", "Team has 50 seats.")],
    ),
    (
        "Give me an example",
        [("What is recursion?", "A function calling itself.")],
        [("What is a closure?", "A function with captured variables.")],
    ),
    (
        "What are the side effects?",
        [("Tell me about ibuprofen", "An NSAID pain reliever.")],
        [("Tell me about statins", "Cholesterol-lowering drugs.")],
    ),
    (
        "Who directed it?",
        [("What's a good sci-fi movie?", "Blade Runner.")],
        [("What's a good comedy?", "Groundhog Day.")],
    ),
    ("Can I return it?", [("I bought a blender", "Great choice!")], [("I bought a gift card", "Nice!")]),
    (
        "Tell me more",
        [("What is quantum computing?", "Computing with qubits.")],
        [("What is blockchain?", "A distributed ledger.")],
    ),
    (
        "How do I fix it?",
        [("My laptop won't turn on", "Check the charger.")],
        [("My sink is leaking", "Check the trap.")],
    ),
    (
        "Which one is faster?",
        [("Compare trains and buses to Boston", "Trains are pricier.")],
        [("Compare Redis and Memcached", "Both are in-memory.")],
    ),
    (
        "What's the deadline?",
        [("Tell me about the tax return", "It is filed yearly.")],
        [("Tell me about the grant application", "It needs a budget.")],
    ),
    (
        "Summarize that",
        [("Here is my contract: clause 1 ...", "Noted.")],
        [("Here is my essay: intro ...", "Noted.")],
    ),
    (
        "Is it safe?",
        [("I want to try skydiving", "Exciting!")],
        [("I want to eat raw fish", "Sushi is popular.")],
    ),
    ("How many calories?", [("I ate a banana", "Good snack.")], [("I ate a burger", "Tasty.")]),
    (
        "What's the next step?",
        [("I created the database", "Now create a user.")],
        [("I installed the printer", "Now add it in settings.")],
    ),
    (
        "How much is it?",
        [("I'd like the blue one", "The blue jacket?")],
        [("I'd like the red one", "The red jacket?")],
    ),
    (
        "Yes",
        [("Should I book the 9am slot?", "Shall I book it?")],
        [("Do you want to delete everything?", "Confirm deletion?")],
    ),
    (
        "Do it",
        [("Can you cancel my order?", "Shall I cancel order 1?")],
        [("Can you refund my order?", "Shall I refund order 1?")],
    ),
    ("What does it mean?", [("I got error 404", "Not found.")], [("I got error 500", "Server error.")]),
    (
        "And the population?",
        [("What's the capital of Peru?", "Lima.")],
        [("What's the capital of Chile?", "Santiago.")],
    ),
]


# Held out for follow-up turns, written before the conversation-state scope existed and never
# tuned on: each follow-up of MULTITURN (by index) asked in other words. Served only when the
# conversation before it is the same; the same rewording after the other conversation is a trap.
FOLLOWUP_REWORDED = {
    0: "What does the cheapest one cost?",
    1: "And the second one?",
    2: "Could you shorten it?",
    3: "What about in French?",
    4: "Why is that?",
    5: "How much time does it take?",
    6: "Is it open right now?",
    7: "What does it cost?",
    8: "Can you give me an example?",
    9: "What side effects does it have?",
    10: "Who was the director?",
    11: "Am I able to return it?",
    12: "Tell me more about it",
    13: "How can I fix it?",
    14: "Which of them is faster?",
    15: "What is the deadline?",
    16: "Give me a summary of that",
    17: "Is it safe to do?",
    18: "How many calories does it have?",
    19: "What should I do next?",
    20: "What's the price?",
}


def _cosmetic(history: list[tuple[str, str]]) -> list[list[str]]:
    """The same conversation as a client may resend it: case and trailing punctuation changed."""
    return [[user.lower().rstrip("?!. "), assistant] for user, assistant in history]


def _pairs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, (a, b) in enumerate(PARAPHRASES):
        out.append({"id": f"para-{i}", "kind": "paraphrase", "a": a, "b": b, "label": True})
    for i, (a, b, kind) in enumerate(TRAPS):
        out.append({"id": f"{kind}-{i}", "kind": kind, "a": a, "b": b, "label": False})
    for i, (a, b) in enumerate(HOLDOUT_PARAPHRASES):
        out.append(
            {
                "id": f"holdout-para-{i}",
                "kind": "paraphrase",
                "split": "holdout",
                "a": a,
                "b": b,
                "label": True,
            }
        )
    for i, (a, b, kind) in enumerate(HOLDOUT_TRAPS):
        out.append(
            {"id": f"holdout-{kind}-{i}", "kind": kind, "split": "holdout", "a": a, "b": b, "label": False}
        )
    for i, (text, change) in enumerate(SCOPE):
        out.append(
            {"id": f"scope-{i}", "kind": "scope", "a": text, "b": text, "b_scope": change, "label": False}
        )
    for i, (text, history_a, history_b) in enumerate(MULTITURN):
        for j, (ha, hb) in enumerate(((history_a, history_b), (history_b, history_a))):
            out.append(
                {
                    "id": f"multiturn-{i}-{j}",
                    "kind": "multiturn",
                    "a": text,
                    "b": text,
                    "a_history": [list(t) for t in ha],
                    "b_history": [list(t) for t in hb],
                    "label": False,
                }
            )
        # The same follow-up in the same conversation is a true repeat (exact tier).
        out.append(
            {
                "id": f"multiturn-same-{i}",
                "kind": "multiturn_same",
                "a": text,
                "b": text,
                "a_history": [list(t) for t in history_a],
                "b_history": [list(t) for t in history_a],
                "label": True,
            }
        )
    for i, reworded in FOLLOWUP_REWORDED.items():
        text, history_a, history_b = MULTITURN[i]
        same = [list(t) for t in history_a]
        for kind, b, b_history, label in (
            ("followup_reworded", reworded, same, True),
            ("followup_cosmetic", text, _cosmetic(history_a), True),
            ("followup_changed", reworded, [list(t) for t in history_b], False),
        ):
            out.append(
                {
                    "id": f"{kind}-{i}",
                    "kind": kind,
                    "split": "holdout",
                    "a": text,
                    "b": b,
                    "a_history": same,
                    "b_history": b_history,
                    "label": label,
                }
            )
    return out


def main() -> None:
    path = Path(__file__).with_name("cache_eval.jsonl")
    pairs = _pairs()
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"wrote {len(pairs)} pairs to {path}")


if __name__ == "__main__":
    main()
