"""Print the installed vLLM's runtime requirements less torch and the CUDA-only ones: what a
source install with VLLM_TARGET_DEVICE=empty (vllm-ascend's) installs, requirements/common.txt."""
import re
from importlib.metadata import requires

SKIP = re.compile(r"^(torch|torchaudio|torchvision|torchcodec|numba|pynvvideocodec|flashinfer.*|apache-tvm-ffi|tilelang|"
                  r"nvidia-.*|nvtx|fastsafetensors|instanttensor|quack-kernels|tokenspeed-mla|humming-kernels|"
                  r"xformers|triton.*|cupy.*)$", re.I)
for req in requires("vllm") or []:
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
    if "extra ==" not in req and not SKIP.match(name):
        print(req)
