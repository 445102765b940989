"""The embedded demo (:mod:`.run`) and the tiny Linux guest it and the tests boot
(:mod:`.guest`, with its serial console client :mod:`.console`).

Sits above site/ and server/: it wires a home server, two sites and a guest
together. Nothing in isrsync's core imports it; only ``isrsync demo`` and the
tests do.
"""
