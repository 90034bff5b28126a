"""Benchmarks: run as modules from the repo root, e.g. `python -m bench.reward`. Each prints ratios against a
baseline measured in the same run; the figures and commands are in BENCHMARKS.md."""

import argparse


def data_model_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a bench on a dataset and a model: its docstring as --help, --data (a BEIR
    folder) and --model (a model folder), both required."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    return ap
