from hfsoup.cli import entry

entry()
