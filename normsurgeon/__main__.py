import os
import sys

# `python -m normsurgeon` puts the working directory first on sys.path; loading makes it importable
# only for --import/--trust (trust.user_code), so it goes.
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from normsurgeon.cli import run  # noqa: E402

run()
