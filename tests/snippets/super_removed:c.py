# Neither: the cell goes again.
OUTCOME = "patched"
PROBES = ["Child().name()", "Child.name(Child())"]


class Base:
    def name(self):
        return "base"


class Child(Base):
    def name(self):
        return "child only"

