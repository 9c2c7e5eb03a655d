"""Facts scripts/setup.sh needs, in one interpreter start (importing torch costs seconds).

Prints three lines:
  1. what the build depends on: Python, torch, its CUDA, the visible GPUs' capabilities;
  2. ``ok`` when this checkout's extension loads in this interpreter, else ``none``;
  3. one sentence for the user: what was built, or why it does not load.
Run with the checkout on PYTHONPATH.
"""
import sys

import torch

try:
    caps = ([torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else "no gpu")
except Exception as exc:  # noqa: BLE001 - a broken driver: the build falls back to 9.0
    caps = f"gpu query failed: {exc}"
print(sys.version.split()[0], torch.__version__, torch.version.cuda, caps)

from overlap import build_info  # noqa: E402

i = build_info()
if i["extension"] == "none":
    print("none")
    print(f"the extension does not load: {i['extension_error']}")
else:
    print("ok")
    archs = ",".join(i["cuda_archs"]) or "-"
    print(f"extension: {i['extension']} build for torch {i['extension_torch_version']}"
          + (f", CUDA archs {archs}" if i["extension"] == "cuda" else "")
          + (" (torch has CUDA but this build is CPU-only: nvcc was not found at build time)"
             if i["extension"] == "cpu" and i["torch_cuda"] else "")
          + f"; triton {i['triton_version'] or 'absent'}")
