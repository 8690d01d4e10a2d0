"""Reading and writing bytes: the Hub (:mod:`~hfsoup.io.hub`, hfsoup's only HTTP calls of its
own), headers, streams, staged output."""
