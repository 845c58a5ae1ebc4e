"""checks.py: the assertion helper of the Python tests (the counterpart of tests/check.h): check() counts a
pass or prints the failure, finish() prints "NAME: P passed, F failed" and exits 1 on any failure."""
import sys

passed = failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what, flush=True)


def finish(name):
    print(f"{name}: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
