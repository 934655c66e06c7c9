# A method that calls super(Cls, self) explicitly, then zero-argument super(), then neither:
# its implicit __class__ cell comes and goes.
OUTCOME = "patched"
PROBES = ["Child().name()", "Child.name(Child())"]


class Base:
    def name(self):
        return "base"


class Child(Base):
    def name(self):
        return super().name() + "+child"

