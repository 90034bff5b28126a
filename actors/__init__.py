"""Ray actors that hold live vLLM engines and generate grouped relevance judgments."""
