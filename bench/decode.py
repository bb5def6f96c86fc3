"""KV-cached decoding benchmark, with the settings of the CPU results in bench/results/decode-cpu.*.

    python bench/decode.py                    # CPU: the paper's grid, 64 new tokens, 1 thread, 3 repeats
    python bench/decode.py --device cuda      # add --device cuda on a GPU (bf16; threads do not matter there)

Any `taperfx bench decode` option can be appended; the work is done by
taperfx.benchmarks.run_decode_benchmark (see its module docstring for the method).
"""

import sys

from taperfx.cli import main

COMMITTED = ["bench", "decode", "--threads", "1", "--new-tokens", "64", "--repeats", "3"]

if __name__ == "__main__":
    sys.exit(main(COMMITTED + sys.argv[1:]))
