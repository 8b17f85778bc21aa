"""Builds relay._egress, the native per-viewer RTP egress loop (relay/_egress.c).

Everything else about the package lives in pyproject.toml; setuptools reads both, so
``python3 -m pip install .`` and ``python3 -m pip install -e '.[test]'`` compile the extension with
the machine's C compiler and Python headers. The C file needs only libc: libsrtp is reached through
the function pointer pylibsrtp's binding exposes (see relay/egress.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "relay._egress",
            ["relay/_egress.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        )
    ],
)
