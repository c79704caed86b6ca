"""Fine-tune on a GLUE task with LETSTrainer; same options as `lets-hf glue` (see `--help`).

Single process:
    python examples/run_glue.py --task sst2 --data_dir examples/data/glue --model_name_or_path minilm \
        --method lets-sam --output_dir out/sst2 --num_train_epochs 1
Several GPUs (DDP):
    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/run_glue.py --task mnli ...
"""

import sys

from lets_hf.cli import main

if __name__ == "__main__":
    main(["glue", *sys.argv[1:]])  # as `lets-hf glue`: user errors in one line, not a traceback
