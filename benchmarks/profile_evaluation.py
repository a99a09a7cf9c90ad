"""Where one evaluation's time goes: each phase of evaluating the undistilled micro student (or a
saved distilled one, ``--student``)
(prefill, decode per seed, teacher prefill and scoring, text metrics, reference KL) timed
alone; with ``--profile`` also a torch-profiler table of one decode. Run alone:

    .venv/bin/python benchmarks/profile_evaluation.py --db /tmp/mem.db [--profile]
"""
import argparse
import statistics
import time

import torch

from common import ROOT  # noqa: F401  (sets sys.path)
from kdbench.config import RunConfig, open_store, resolve
from kdbench.prepare import prepare
from kdbench.evaluation.decoder import Decoder, decode_texts
from kdbench.evaluation.protocol import reference_kl
from kdbench.evaluation.scoring import score_decode
from kdbench import metrics as M
from kdbench.evaluation.sampling import decode_from, draw_uniforms

ap = argparse.ArgumentParser()
ap.add_argument("--db", required=True)
ap.add_argument("--profile", action="store_true")
ap.add_argument("--student", help="a saved student folder (a distilled run's checkpoint_path); default: the undistilled student")
args = ap.parse_args()
torch.manual_seed(0)
req = RunConfig(objective="csd", db=args.db)
obj, suite, label = resolve(req)
engine = open_store(req)
dev = torch.device("cpu")
prep = prepare(suite, dev, progress=False)
if args.student:
    from kdbench.models import load_causal_lm
    from kdbench.device import inference_dtype
    st = load_causal_lm(args.student, inference_dtype(dev)).eval()
else:
    st = prep.new_student().eval()
te = prep.teacher().eval()
task = prep.suite.tasks[0]
inp = prep.task_inputs(task.name)
tok = prep.tokenizer
spec = prep.suite.eval
print("prompts", len(inp.prompt_ids), "mean prompt len", statistics.fmean(map(len, inp.prompt_ids)), "max", max(map(len, inp.prompt_ids)), "batch", spec.batch_size)
def T(name, f):
    t = time.perf_counter()
    r = f()
    print(f"{name}: {time.perf_counter() - t:.2f}s", flush=True)
    return r
with torch.no_grad():
    d = Decoder(st, inp.prompt_ids, spec, dev, pad_id=tok.pad_token_id, keys=inp.keys)
    T("student prefill (every batch, one at a time)", lambda: [d.prefix(i) and None for i in range(len(d.chunks))])
    ids = T("student decode seed 0", lambda: d.generate(0, eos_id=tok.eos_token_id))
    print("gen tokens", sum(map(len, ids)))
    ids = T("student decode seed 0 again", lambda: d.generate(0, eos_id=tok.eos_token_id))
    sc = Decoder(te, inp.prompt_ids, spec, dev, pad_id=tok.pad_token_id, keys=inp.keys)
    T("teacher prefill (every batch, one at a time)", lambda: [sc.prefix(i) and None for i in range(len(sc.chunks))])
    T("teacher logprobs", lambda: sc.logprobs(ids))
    outs = T("decode texts", lambda: decode_texts(tok, ids))
    T("score_decode", lambda: score_decode(task, inp.examples, outs))
    T("self_bleu per prompt (5 seeds)", lambda: M.self_bleu_per_prompt({e.id: [o] * 5 for e, o in zip(inp.examples, outs)}))
    T("self_bleu across", lambda: M.self_bleu_across_prompts(outs))
    T("distinct", lambda: (M.distinct_n(outs,1), M.distinct_n(outs,2)))
    refs = prep.reference_teacher(task.name)
    T("reference kl (cached teacher, prompt caches)", lambda: reference_kl(
        st, refs or te, inp.references, dev, [e.id for e in inp.examples], student_decoder=d, teacher_decoder=sc))
    if args.profile:
        from torch.profiler import profile, ProfilerActivity
        pre = d.prefix(0)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            decode_from(st, pre.copy(), max_new_tokens=32, eos_id=tok.eos_token_id,
                        uniforms=draw_uniforms(0, d.keys[0], 32))
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
