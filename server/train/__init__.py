"""`peftserve train`: fine-tune an adapter of any servable kind on a frozen base model.

    peftserve train --method lora --data train.jsonl --eval-split 0.1 --out adapters/mytask
    peftserve train --demo sentiment --method prompt --out /tmp/sentiment-prompt

Reads top to bottom in `run.train`: config (`config.TrainConfig`) -> data (`data`, or a built-in
demo task from `tasks`) -> model (`methods`: LoRA / prefix / prompt tuning through PEFT, bottleneck
adapters through `bottleneck`) -> loop (`loop`: AdamW, warmup then linear decay, gradient
accumulation, early stopping on validation loss keeping the best weights) -> save (`report`). The
output directory is what `RegisterAdapter` / `engine.adapters.register` loads, plus
`training_config.json`, `metrics.json` (per epoch) and `loss_curve.png`.

Multi-GPU: the loop runs under `accelerate.Accelerator`, so an existing launcher gives DDP with
no code change; each process reads the whole file and takes its shard of every epoch:

    accelerate launch --multi_gpu --num_processes 4 -m peftserve.train --method lora ...
    torchrun --nproc_per_node 4 -m peftserve.train --method lora ...

`--batch-size` is per process (the effective batch is batch x processes x --grad-accum). Only the
main process writes files, scores demo tasks and registers the result. On CUDA the forward runs in
bf16 autocast (fp16 where bf16 is missing) over fp32 weights;
on CPU everything is fp32, one process.
"""
