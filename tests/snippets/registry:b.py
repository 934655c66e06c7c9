# Its body changes: the function kept in the registry runs the new body.
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
    return "hello again"
