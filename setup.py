"""Build hook for the Cython kernels; everything else lives in pyproject.toml."""

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "espstream.kernels._int8",
        ["espstream/kernels/_int8.pyx"],
        depends=["espstream/kernels/_hot.h"],  # hot loops, cloned for AVX2 where supported
        include_dirs=[np.get_include(), "espstream/kernels"],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
