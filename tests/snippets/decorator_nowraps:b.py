# The decorated function's body changes (only its body: the statement is not run again).
OUTCOME = "patched"
PROBES = ["munch(4)", "munch(4, 2)"]


def plus(n):
    def deco(fn):
        def wrapper(*args):
            return fn(*args) + n
        return wrapper
    return deco


@plus(1)
def munch(x, y=0):
    return x * 4 + y
