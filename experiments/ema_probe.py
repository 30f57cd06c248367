"""Experiment (docs/results.md, "A moving average of the weights"): several moving
averages of the weights in one run, then what ``--ema D`` would have kept.

    python experiments/ema_probe.py train --scst --init CKPT --out OUT ...   # rnncap train, plus:
        # after every update, an average per decay in EMA_DECAYS (default 0.99,0.995,0.998),
        # float64, from the starting weights; each epoch, its greedy val CIDEr-D on the
        # log line ("ema0.995 0.4541") and its weights in OUT/emaD-epoch-E.npz
    python experiments/ema_probe.py select OUT D
        # the kept model of decay D (reading OUT.log, the train command's stderr): the best
        # epoch of the average, or the mean of the best 3 if val CIDEr-D prefers it, as
        # OUT/emaD-kept.npz for `rnncap evaluate`

The raw weights train exactly as without the probe, so one run gives the default's
result and every decay's.
"""
import json
import os
import sys

import numpy as np

from rnncap.training import train as T

_step, _validate = T.Trainer.step, T.Trainer.validate


def _decays():
    return [float(d) for d in os.environ.get("EMA_DECAYS", "0.99,0.995,0.998").split(",")]


def step(self, rows, lr):
    if not hasattr(self, "_emas"):
        self._emas = {d: {k: v.astype(np.float64) for k, v in self.model.params.items()} for d in _decays()}
    out = _step(self, rows, lr)
    for d, e in self._emas.items():
        for k, v in self.model.params.items():
            e[k] = d * e[k] + (1 - d) * v
    return out


def validate(self):
    out = _validate(self)
    raw = dict(self.model.params)
    for d, e in self._emas.items():
        p = {k: v.astype(raw[k].dtype) for k, v in e.items()}
        self.model.params.update(p)
        out[f"ema{d}"] = self.val_fn(self.model)["val_cider"]
        self.model.params.update(raw)
        self.checkpoint_fn(os.path.join(self.out_dir, f"ema{d}-epoch-{self.epoch}.npz"),
                           {k: v for k, v in self.state().items() if k != "optimizer"}, params=p)
    return out


def select(run, decay):
    from rnncap.checkpoint import load_checkpoint, save_checkpoint
    from rnncap.config import DataConfig, from_dict
    from rnncap.data.datasets import load_dataset

    log = open(run + ".log").read()
    scores = {}
    for line in log.splitlines():
        if line.startswith("epoch "):
            toks = line.replace(",", "").split()
            scores[int(toks[1].split("/")[0])] = float(toks[toks.index(f"ema{decay}") + 1])
    top = sorted(scores, key=lambda e: (-scores[e], e))[:3]
    cks = {e: load_checkpoint(f"{run}/ema{decay}-epoch-{e}.npz") for e in top}
    ck = cks[top[0]]
    data_cfg = from_dict(DataConfig, ck.configs["data"])
    ds = load_dataset(data_cfg.captions)
    data, _, _ = T.prepare_data(ds, ck.vocab, data_cfg.features, data_cfg, splits=("val",),
                                pca=ck.pca if ck.pca is not None else False, encoder=ck.encoder)
    val_fn = T.cider_val_fn(ck.vocab, data["val"][0], ds.splits["val"].references, data_cfg.max_length + 1)
    avg = {k: (sum(cks[e].model.params[k].astype(np.float64) for e in top) / len(top)).astype(np.float32)
           for k in ck.model.params}
    s_avg = val_fn(T.with_params(ck.model, avg))["val_cider"]
    kept = avg if s_avg > scores[top[0]] else ck.model.params
    print(json.dumps({"scores": scores, "top": top, "average": s_avg,
                      "kept": "average" if kept is avg else f"epoch {top[0]}"}))
    save_checkpoint(f"{run}/ema{decay}-kept.npz", T.with_params(ck.model, kept), ck.vocab,
                    encoder=ck.encoder, pca=ck.pca, configs=ck.configs, history=ck.history)


if __name__ == "__main__":
    if sys.argv[1] == "select":
        select(sys.argv[2], sys.argv[3])
    else:
        T.Trainer.step, T.Trainer.validate = step, validate
        from rnncap.cli import main

        sys.exit(main(sys.argv[1:]))
