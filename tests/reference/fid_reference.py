#!/usr/bin/python3
"""Writes tests/reference/fid.json, the Frechet distances tests/test-fid.c
checks engine/fid.c against.

Each case has two feature sets made by a formula both sides evaluate
(features(i, j) below, in float64 then rounded to float32, as the engine
stores features), so the fixture holds only the results:
  mu1, cov1 (unbiased, divided by N - 1) statistics of the first set,
  evals1   eigenvalues of cov1, ascending (torch.linalg.eigh),
  fd       |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2).
tr sqrt(S1 S2) is computed two independent ways in float64 and the script
stops if they disagree: the symmetric form sum sqrt(eigh(R S2 R)) with
R = sqrt(S1) from eigh, and the square roots of the (real, non-negative)
eigenvalues of the non-symmetric product S1 S2 from torch.linalg.eigvals.

Usage: /usr/bin/python3 tests/reference/fid_reference.py [out.json]
"""
import json
import math
import os
import sys

import torch

torch.set_default_dtype(torch.float64)

# (d, n1, n2, a1, a2, shift): the second set is scaled by a2 / a1 and
# shifted, so the distance is far from zero.
CASES = [
    (5, 50, 60, 1.0, 1.3, 0.25),
    (64, 500, 400, 1.0, 0.8, 0.1),
    (128, 700, 900, 1.0, 1.1, -0.05),
]


def features(n, d, a, shift, phase):
    """f[i, j] = a (sin(0.37 (i+1)(j+1) + 0.11 j + phase)
                    + 0.5 cos(1.7 i + 0.3 j^2)) + shift j / d, as float32."""
    i = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(d, dtype=torch.float64).unsqueeze(0)
    f = a * (torch.sin(0.37 * (i + 1) * (j + 1) + 0.11 * j + phase)
             + 0.5 * torch.cos(1.7 * i + 0.3 * j * j)) + shift * j / d
    return f.float().double()


def stats(f):
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def sym_sqrt(a):
    w, v = torch.linalg.eigh(a)
    return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "fid.json")
    cases = []
    for d, n1, n2, a1, a2, shift in CASES:
        f1 = features(n1, d, a1, 0.0, 0.0)
        f2 = features(n2, d, a2, shift, 0.4)
        mu1, s1 = stats(f1)
        mu2, s2 = stats(f2)

        r = sym_sqrt(s1)
        m = r @ s2 @ r
        tr_sym = torch.linalg.eigh((m + m.T) / 2)[0].clamp(min=0).sqrt().sum()
        ev = torch.linalg.eigvals(s1 @ s2)
        tr_gen = ev.real.clamp(min=0).sqrt().sum()
        scale = float(torch.trace(s1) + torch.trace(s2))
        if abs(float(tr_sym - tr_gen)) > 1e-7 * scale:
            sys.exit("d %d: the two traces disagree: %r vs %r"
                     % (d, float(tr_sym), float(tr_gen)))

        fd = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1)
                   + torch.trace(s2) - 2 * tr_sym)
        cases.append({
            "d": d, "n1": n1, "n2": n2, "a1": a1, "a2": a2, "shift": shift,
            "fd": fd,
            "mu1": mu1.tolist(),
            "cov1_diag": torch.diagonal(s1).tolist(),
            "evals1": torch.linalg.eigvalsh(s1).tolist(),
        })
        print("d %3d: fd %.10g (trace terms %.6g)" % (d, fd, scale))
    with open(out, "w") as fp:
        json.dump({"generator": "tests/reference/fid_reference.py",
                   "torch": torch.__version__, "cases": cases}, fp, indent=1)
        fp.write("\n")


if __name__ == "__main__":
    main()
