"""Build the Cython hot paths; every other piece of metadata lives in pyproject.toml.

Each ``mirror/_fast/*.pyx`` becomes an extension module.  The rolling-checksum engine
includes the system xxHash header (Debian: libxxhash-dev) in inline mode, so no shared
library is linked at run time.
"""

import glob
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup


def _require_xxhash_header() -> None:
    for directory in ("/usr/include", "/usr/local/include", os.environ.get("XXHASH_INCLUDE", "")):
        if directory and os.path.exists(os.path.join(directory, "xxhash.h")):
            return
    sys.exit(
        "hamirror needs the xxHash C header to build its native code: "
        "apt-get install libxxhash-dev (Debian/Ubuntu), dnf install xxhash-devel (Fedora), "
        "or set XXHASH_INCLUDE to the directory holding xxhash.h"
    )


_require_xxhash_header()

extensions = [
    Extension(
        name="mirror._fast." + os.path.splitext(os.path.basename(path))[0],
        sources=[path],
        include_dirs=[d for d in [os.environ.get("XXHASH_INCLUDE")] if d],
        extra_compile_args=["-O3", "-fno-strict-aliasing"],
    )
    for path in sorted(glob.glob("mirror/_fast/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
