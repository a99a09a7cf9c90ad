import sys

from kdbench.allocator import reexec_with_mimalloc

reexec_with_mimalloc()  # before torch is imported: see kdbench/allocator.py

from kdbench.cli import main  # noqa: E402

sys.exit(main())
