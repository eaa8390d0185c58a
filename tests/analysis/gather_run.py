"""Run by `accelerate launch` from test_distributed.py: each process streams its share of the rows, the stores are
gathered through accelerate, and the main process saves the merge to the folder given as argument."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from lorsa_hf.analysis import CorpusOptions, analyze_corpus, gather_store
from tests.analysis.conftest import make_layer1_lorsa, make_model, make_tokenizer, sample_texts


def main(folder: str) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    options = CorpusOptions(16, 16 * 9, 2, rank=accelerator.process_index, world_size=accelerator.num_processes)
    store = analyze_corpus(model, make_layer1_lorsa(model), 1, sample_texts(), tokenizer, options, top_n=5,
                           sample_size=6, progress=False)
    merged = gather_store(store, accelerator)
    if accelerator.is_main_process:
        merged.save(f"{folder}/merged.safetensors")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
