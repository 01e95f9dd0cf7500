"""How far two correct attention implementations' logits drift apart after int8-rounded
matmul inputs (MatMulNBits accuracy level 4): the plugin kernel vs the standard-op function
bodies, on one prompt, prefill logits at every position.

    python scripts/level4_noise.py EXPORT_DIR [EXPORT_DIR ...]

At level 0 (fp32 compute) the two differ by float summation order (~1e-4 of logits that
reach ~30); at level 4 an input that lands on the other side of an int8 rounding boundary
changes a whole block's product, and 30 layers amplify that into differences of the same
size as the quantization error itself (docs/export.md, "Accuracy level").
"""

import sys

import numpy as np

from ragtop.runtime import load_model
from ragtop.runtime.runners.base import Chunk
from ragtop.runtime.runners.onnxruntime import OrtRunner

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhich city is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


def main(folders: list[str]) -> None:
    for folder in folders:
        ids = load_model(folder, threads=1).tokenizer.encode(CHAT).ids
        logits = {}
        for plugin in (True, False):
            runner = OrtRunner(folder, threads=1, use_plugin=plugin)
            runner.allocate(1, len(ids) + 16)
            logits[plugin] = np.asarray(runner.forward([Chunk(0, ids, 0, "all")])[0])
        diff = np.abs(logits[True] - logits[False]).max(axis=-1)
        top = [np.argsort(-logits[p][-1])[:2].tolist() for p in (True, False)]
        print(
            f"{folder}: {len(ids)} tokens; max |plugin - standard ops| over positions {diff.max():.3g} "
            f"(median {np.median(diff):.3g}); logits range {np.ptp(logits[False][-1]):.1f}; "
            f"top-2 next tokens plugin {top[0]}, standard ops {top[1]}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
