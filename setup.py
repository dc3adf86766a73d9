"""Build fastkd: the Python package (`kernels/` and `bench/` installed as `fastkd.kernels` and
`fastkd.bench`) and the native extension `fastkd._C` from `csrc/`: CPU kernels always, CUDA
kernels only where a CUDA toolkit and a CUDA build of torch are both present."""

import glob
import os
import platform

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Sources compiled with extra instruction-set flags (x86-64 only); their kernels run only
# after a run-time CPU check, so the extension still loads on older CPUs.
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                    "-mf16c"],
}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _isa_flags(source: str):
    for suffix, flags in ISA_FLAGS.items():
        if X86 and source.endswith(suffix):
            return flags
    return None


def _with_isa_build(base):
    """`base` (torch's BuildExtension) that compiles the ISA_FLAGS sources separately."""

    class BuildWithIsaFlags(base):
        def build_extension(self, ext):
            for source in [s for s in ext.sources if _isa_flags(s)]:
                args = ext.extra_compile_args
                flags = _isa_flags(source)
                post = ({**args, "cxx": args["cxx"] + flags} if isinstance(args, dict)
                        else list(args) + flags)
                ext.sources.remove(source)
                ext.extra_objects = list(ext.extra_objects or []) + self.compiler.compile(
                    [source], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=post,
                    depends=ext.depends)
            super().build_extension(ext)

    return BuildWithIsaFlags


def _native_extensions():
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*_api.cpp"))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    build_cuda = (
        os.environ.get("FASTKD_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    common = dict(
        name="fastkd._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if build_cuda:
        nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                      "-gencode=arch=compute_80,code=sm_80",
                      "-gencode=arch=compute_90a,code=sm_90a"]
        ext = cpp_extension.CUDAExtension(
            sources=cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFASTKD_WITH_CUDA"], "nvcc": nvcc_flags},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(
            sources=cpu_sources, extra_compile_args={"cxx": cxx_flags}, **common
        )
    build_ext = _with_isa_build(cpp_extension.BuildExtension.with_options(use_ninja=True))
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _native_extensions()

setup(
    packages=find_packages(include=["fastkd", "fastkd.*"]) + ["fastkd.kernels", "fastkd.bench"],
    package_dir={"fastkd.kernels": "kernels", "fastkd.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
