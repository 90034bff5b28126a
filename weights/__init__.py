"""The weight transport: every version the learner publishes, to every live vLLM engine, without a restart.

Both ends of the wire live here, behind the interface in prorank/run/weight_transport.py that the learner
(publish a version) and the actors (pull it, apply it between two chunks) are handed by the driver:

- transport.py   the gRPC implementation of the two ends (GrpcTransport makes them from the job's token
                 and `weights.*` settings): the one file a newcomer reads first
- server.py      WeightServer / WeightPublisher: serves versions (rank 0's, or an actor's relay)
- receiver.py    fetch_version / pull_newest: receives one into a reused safetensors blob, verified
- codec.py       manifests, chunks and checksums (the messages are protocol/weights.proto's)
- vllm_extension.py  runs inside vLLM's worker: applies a received blob in place
"""
