"""Train a transformer on IWSLT'14 De-En with LETSTrainer and report BLEU; the same command as `lets-hf iwslt14`.

A CPU-sized run on the real data subset shipped beside the repository:

    python examples/run_iwslt14.py --data_dir ../shared/data/iwslt14.tokenized.de-en \\
        --arch transformer_small --method lets-sam --output_dir out/iwslt14-small --num_train_epochs 5

The full recipe (raw release or fairseq's tokenized layout, ~50 epochs on a GPU):

    python examples/run_iwslt14.py --data_dir iwslt14.tokenized.de-en --arch transformer_iwslt_de_en \\
        --method lets-sam --output_dir out/iwslt14 --num_train_epochs 50

`--help` lists every flag, all TrainingArguments and LETSConfig ones included.
"""

import sys

from lets_hf.cli import main

if __name__ == "__main__":
    main(["iwslt14", *sys.argv[1:]])  # as `lets-hf iwslt14`: user errors in one line, not a traceback
