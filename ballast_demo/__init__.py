"""The front-page surge: the workload model, the load driver, the report and the demo."""
