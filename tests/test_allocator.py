"""``bclib.train.keep_freed_memory``: a Bayesian training step stops faulting in fresh pages.

Each case runs in a fresh interpreter (the setting is process-wide and cannot be undone) and counts
the minor page faults of the process over a few LeNet-5-Caffe NJ training steps with
``resource.getrusage``, which the kernel counts independently of the code under test.

Both cases start from glibc's initial mmap threshold (128 KiB), pinned with ``GLIBC_TUNABLES``.
Left alone, glibc raises the threshold each time the process frees a mapped block larger than it,
so how often the defaults fault depends on the order of a process's allocations: from about 46,000
faults a step to almost none here (0.3 a step in one CI run), which would decide the test by chance.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STEPS_SCRIPT = """
import json, resource, sys
import torch
import torch.nn.functional as F
import bclib
from bclib import models
from bclib.train import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model = models.lenet5_caffe("nj").train()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))

def step():
    loss = F.cross_entropy(model(x), y) + bclib.kl_divergence(model) / 60000
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

for _ in range(10):  # the heap grows to its working size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"kept": kept, "faults_per_step": faults}))
"""


# glibc's M_MMAP_THRESHOLD before any dynamic adjustment (DEFAULT_MMAP_THRESHOLD_MIN in its malloc.c).
INITIAL_MMAP_THRESHOLD = 128 * 1024


def _steps(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={INITIAL_MMAP_THRESHOLD}"}
    result = subprocess.run([sys.executable, "-c", STEPS_SCRIPT, mode], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_keep_freed_memory_stops_the_page_faults_of_a_bayesian_step(glibc):
    default, kept = _steps("default"), _steps("keep")
    assert kept["kept"] is glibc
    if not glibc:
        return  # nothing is changed without glibc; the default count is then the allocator's own
    # From glibc's initial threshold every large temporary is a fresh mapping: thousands of faults a
    # step (fewer where the kernel backs the mappings with transparent huge pages, one fault per 2 MB).
    assert default["faults_per_step"] > 200, default
    assert kept["faults_per_step"] < default["faults_per_step"] / 10, (default, kept)
