"""The z-pattern of a Lorsa head on a block of random tokens repeated once, as the induction detector probes it:
an induction head's activation in the second copy comes from the token after the earlier occurrence of the
current one, a stripe one step right of the diagonal of the copy. Writes a PNG heat map.
Usage: python scripts/induction_zpattern.py --layer 18 --head 3450 --output docs/zpattern-induction-l18.png
"""

from __future__ import annotations

import argparse

import torch

from lorsa_hf import LorsaForReplacement, load_embedded_model, pretrained_default_dir
from lorsa_hf.analysis import write_z_pattern_heatmap, z_pattern
from lorsa_hf.analysis.probes import ordinary_tokens, probe_sequences
from lorsa_hf.analysis.reading import LayerReader, check_layer, spliced_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--head", type=int, required=True)
    parser.add_argument("--block", type=int, default=12, help="random tokens in the block that repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    model, tokenizer = load_embedded_model()
    lorsa = LorsaForReplacement.from_pretrained(pretrained_default_dir())
    probes = probe_sequences(ordinary_tokens(tokenizer), tokenizer.bos_token_id, length=2 * args.block,
                             seed=args.seed)
    ids = probes.repeated[:1]
    module = check_layer(lorsa, args.layer)
    with spliced_at(model, lorsa, args.layer), torch.no_grad():
        read = LayerReader(model, module)(ids)
        contributions = z_pattern(module, read.hidden_states, **read.arguments).contributions(args.head)
    labels = [tokenizer.decode([t]) for t in ids[0].tolist()]
    title = f"layer {args.layer} head {args.head}: z-pattern on {args.block} random tokens repeated once"
    write_z_pattern_heatmap(args.output, contributions, labels, title)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
