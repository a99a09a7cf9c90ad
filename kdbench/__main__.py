import sys

from kdbench.allocator import bound_kernel_caches, reexec_with_mimalloc

bound_kernel_caches()  # before torch is imported: see kdbench/allocator.py
reexec_with_mimalloc()

from kdbench.cli import main  # noqa: E402

sys.exit(main())
