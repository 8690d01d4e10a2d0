"""Reading and writing bytes: the Hub (the only HTTP), headers, streams, staged output."""
