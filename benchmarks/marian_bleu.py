"""Quality at equal time: HF `MarianMTModel` trained like `experiment=translate_ko_en`, for the same wall time.

Every setting comes from the composed experiment: the data and splits, the joint BPE (trained on the training
split), the sizes (shared and tied embeddings), the activation and the three dropouts, the token-budget batches,
Adam (0.9, 0.98, 1e-9) with the paper's warm-up, label smoothing and gradient clipping. The loop trains without
pausing for validation (our run validates inside its budget, so this favours the peer), then decodes the test
split greedily (`max_new_tokens` = 1.5 · source + 10) and scores it with sacrebleu, as our run does.

    python benchmarks/marian_bleu.py --minutes 30     # compare with test/bleu in our run's metrics.json
    python benchmarks/marian_bleu.py --seed 1         # compare with `seq2seq train experiment=translate_ko_en seed=1`
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import sacrebleu
import torch
import torch.nn.functional as F
from transformers import MarianConfig, MarianMTModel

from seq2seq import compose
from seq2seq.build import fit_tokenizers, load_tokenizers
from seq2seq.config import resolve_precision
from seq2seq.data import Collate, TrainingBatches
from seq2seq.registry import DATASETS
from seq2seq.schedule import WarmupSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0, help="compare with our run at the same `seed=`")
    parser.add_argument("--precision", default="auto", choices=("auto", "32-true", "bf16-mixed"),
                        help="as `trainer.precision`; auto: what our run would choose on this machine")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg = compose(["experiment=translate_ko_en", f"seed={args.seed}", f"trainer.precision={args.precision}"])
    precision, why = resolve_precision(cfg.trainer)
    print(f"precision {precision} ({why})")
    m, o, lo = (dataclasses.asdict(block) for block in (cfg.model, cfg.optim, cfg.loader))
    reader = DATASETS.build(cfg.data, "data")
    train, test = reader.read("train").pairs, reader.read("test").pairs
    tok, _ = load_tokenizers(cfg, fit_tokenizers(cfg, train))
    def fits(src: str, tgt: str) -> bool:  # the length limits our data module applies (it counts the rest)
        return len(tok.encode(src)) <= lo["max_src_len"] and len(tok.encode(tgt)) < lo["max_tgt_len"]

    train, test = [p for p in train if fits(*p)], [p for p in test if fits(*p)]
    examples = [(tok.encode(s), tok.encode(t)) for s, t in train]
    config = MarianConfig(
        vocab_size=tok.vocab_size, d_model=m["d_model"], encoder_layers=m["n_encoder_layers"],
        decoder_layers=m["n_decoder_layers"], encoder_attention_heads=m["n_heads"],
        decoder_attention_heads=m["n_heads"], encoder_ffn_dim=m["d_ff"], decoder_ffn_dim=m["d_ff"],
        max_position_embeddings=m["max_positions"], pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
        decoder_start_token_id=tok.bos_id, forced_eos_token_id=None, scale_embedding=True, dropout=m["dropout"],
        attention_dropout=m["attention_dropout"], activation_dropout=m["activation_dropout"],
        activation_function=m["activation"],
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    model = MarianMTModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    schedule = WarmupSchedule("noam", m["d_model"], o["warmup_steps"], 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    sampler = TrainingBatches([max(len(s), len(t) + 1) for s, t in examples], lo["max_tokens"], seed=args.seed)
    collate = Collate(tok.pad_id, tok.pad_id, tok.bos_id, tok.eos_id)
    deadline, steps, epoch, tokens = time.perf_counter() + args.minutes * 60, 0, 0, 0
    model.train()
    while time.perf_counter() < deadline:
        sampler.set_epoch(epoch)
        for batch_ids in sampler:
            b = collate([examples[i] for i in batch_ids])
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
                out = model(input_ids=b.src, attention_mask=b.src_keep.long(), decoder_input_ids=b.tgt_in,
                            decoder_attention_mask=b.tgt_keep.long())
            keep = b.tgt_keep
            loss = F.cross_entropy(out.logits[keep].float(), b.tgt_out[keep], label_smoothing=o["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
            optimizer.step()
            scheduler.step()
            steps, tokens = steps + 1, tokens + int(keep.sum())
            if time.perf_counter() >= deadline:
                break
        epoch += 1
    model.eval()
    hyps = []
    with torch.inference_mode():
        for start in range(0, len(test), 64):
            srcs = [tok.encode(s) for s, _ in test[start : start + 64]]
            b = collate([(s, torch.empty(0, dtype=torch.long)) for s in srcs])
            budget = int(cfg.decode.max_len_a * b.src.shape[1] + cfg.decode.max_len_b)
            gen = model.generate(input_ids=b.src, attention_mask=b.src_keep.long(), num_beams=1, do_sample=False,
                                 max_new_tokens=budget)
            hyps += [tok.decode(row.tolist()) for row in gen]
    refs = [t for _, t in test]
    print(f"MarianMTModel: {args.minutes:g} min, {steps} steps, {epoch} epochs started, {tokens} target tokens")
    bleu, chrf = sacrebleu.corpus_bleu(hyps, [refs]).score, sacrebleu.corpus_chrf(hyps, [refs]).score
    print(f"test BLEU {bleu:.2f}  chrF {chrf:.2f}  ({len(test)} sentences, greedy)")


if __name__ == "__main__":
    main()
