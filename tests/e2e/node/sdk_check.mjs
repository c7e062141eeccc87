// The official OpenAI Node SDK against Ballast's HTTP face, changing only baseURL and the key.
// Run by tests/e2e/test_openai_sdk.py, which reads the JSON object printed on the last line.
// Environment: BALLAST_BASE_URL, BALLAST_KEY (paid tier), BALLAST_TINY_KEY (1 request per few
// seconds), BALLAST_SESSION_ID (an empty session of BALLAST_KEY's tenant).
import OpenAI from "openai";

const baseURL = process.env.BALLAST_BASE_URL;
const bypass = { "x-ballast-cache": "bypass" };
const client = new OpenAI({ baseURL, apiKey: process.env.BALLAST_KEY, defaultHeaders: bypass });
const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather for a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};
const results = {};
const question = [{ role: "user", content: "How do I reset my password? (node)" }];

// A plain completion, and the same one streamed: same text, same usage.
const plain = await client.chat.completions.create({ model: "sim-small", messages: question });
results.plain = plain.choices[0].message.content.startsWith("[simulated") && plain.usage.total_tokens > 0;
let text = "";
let usage = null;
const stream = await client.chat.completions.create({
  model: "sim-small",
  messages: question,
  stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
results.stream_matches =
  text === plain.choices[0].message.content && JSON.stringify(usage) === JSON.stringify(plain.usage);

// A tool call, its result, the answer; and the tool call streamed.
const ask = { role: "user", content: "Use get_weather for Lisbon." };
const first = await client.chat.completions.create({ model: "sim-small", messages: [ask], tools: [weather] });
const call = first.choices[0].message.tool_calls[0];
const answer = await client.chat.completions.create({
  model: "sim-small",
  messages: [ask, first.choices[0].message, { role: "tool", tool_call_id: call.id, content: '{"forecast":"sun"}' }],
  tools: [weather],
});
results.tool_round_trip =
  first.choices[0].finish_reason === "tool_calls" &&
  call.function.name === "get_weather" &&
  answer.choices[0].message.content.includes("Based on the tool result");
const runner = client.chat.completions.stream({ model: "sim-small", messages: [ask], tools: [weather] });
const streamed = await runner.finalChatCompletion();
const streamedCall = streamed.choices[0].message.tool_calls[0];
results.tool_stream =
  streamedCall.id === call.id &&
  streamedCall.function.arguments === call.function.arguments &&
  streamed.choices[0].finish_reason === "tool_calls";

// Three turns of one session, carried by a header.
const inSession = new OpenAI({
  baseURL,
  apiKey: process.env.BALLAST_KEY,
  defaultHeaders: { "x-ballast-session-id": process.env.BALLAST_SESSION_ID },
});
const versions = [];
for (const turn of ["I am Grace.", "I like coffee.", "Who am I?"]) {
  const { response } = await inSession.chat.completions
    .create({ model: "sim-small", messages: [{ role: "user", content: turn }] })
    .withResponse();
  versions.push(Number(response.headers.get("x-ballast-session-version")));
}
results.session = versions.length === 3 && versions[0] < versions[1] && versions[1] < versions[2];

// The catalog and embeddings.
const ids = [];
for await (const model of client.models.list()) ids.push(model.id);
results.models = ["sim-small", "fast", "reasoning", "embedding"].every((id) => ids.includes(id));
const embedded = await client.embeddings.create({ model: "sim-embed", input: ["rain", "sun"] });
results.embeddings = embedded.data.length === 2 && embedded.data[0].embedding.length === 256;

// A 429 is a RateLimitError without retries; with retries the SDK waits its retry-after.
let attempts = 0;
const counted = async (url, init) => {
  attempts += 1;
  return fetch(url, init);
};
const tiny = new OpenAI({ baseURL, apiKey: process.env.BALLAST_TINY_KEY, maxRetries: 0, fetch: counted });
await tiny.chat.completions.create({ model: "sim-small", messages: question });
try {
  await tiny.chat.completions.create({ model: "sim-small", messages: question });
  results.rate_limit_error = false;
} catch (error) {
  results.rate_limit_error =
    error instanceof OpenAI.RateLimitError && error.code === "rate_limit_exceeded" && attempts === 2;
}
attempts = 0;
const patient = new OpenAI({ baseURL, apiKey: process.env.BALLAST_TINY_KEY, maxRetries: 3, fetch: counted });
const waited = await patient.chat.completions.create({ model: "sim-small", messages: question });
results.retried_after_retry_after = attempts >= 2 && waited.choices[0].message.content.length > 0;

// A bad parameter is a BadRequestError naming it.
try {
  await client.chat.completions.create({ model: "sim-small", messages: question, n: 3 });
  results.bad_request_param = null;
} catch (error) {
  results.bad_request_param = error instanceof OpenAI.BadRequestError ? error.param : String(error);
}

console.log(JSON.stringify(results));
