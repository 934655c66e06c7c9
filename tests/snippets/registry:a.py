# A decorator that returns its registry, not the function: the module never binds the function.
OUTCOME = "patched"
PROBES = ["activities.run('greet')"]


class Registry:
    def __init__(self):
        self.functions = {}

    def register(self, fn):
        self.functions[fn.__name__] = fn
        return self

    def run(self, name):
        return self.functions[name]()


activities = Registry()


@activities.register
def greet():
    return "hello"
