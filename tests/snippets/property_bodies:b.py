# The same property, with no instance made while the module loads: only the changed bodies are swapped.
OUTCOME = "patched"
PROBES = ["FakeApple().color", "set_and_get('green')"]


class FakeApple:
    def __init__(self):
        self._color = "red"

    @property
    def color(self):
        return self._color.upper()

    @color.setter
    def color(self, value):
        self._color = value


def set_and_get(value):
    a = FakeApple()
    a.color = value
    return a.color
