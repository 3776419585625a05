"""Build lorafast/data/stdlib.txt.gz, the built-in training corpus (run once; the output is committed).

Real text that needs no download: the sources (code, comments and docstrings) of a fixed list of
pure-Python standard-library modules of the Python that runs this script (CPython 3.11 for the
shipped file; the Python Software Foundation License allows redistribution). Each module becomes
one document, separated by a form feed; lorafast.data splits documents into train and validation.
"""
import gzip
import os
import sysconfig

MODULES = """
abc argparse ast base64 bdb bisect calendar cmd code codecs collections/__init__ colorsys
configparser contextlib copy csv dataclasses datetime decimal difflib dis doctest enum
fileinput fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html/__init__
imaplib inspect ipaddress json/__init__ json/decoder json/encoder keyword linecache locale logging/__init__
mailbox mimetypes netrc numbers operator optparse os pathlib pdb pickle pickletools platform plistlib poplib
pprint profile pstats queue quopri random re/__init__ reprlib sched secrets selectors shelve shlex shutil
smtplib socket socketserver statistics string stringprep subprocess symtable tabnanny tarfile tempfile
textwrap threading timeit token tokenize trace traceback tracemalloc turtle types typing uuid warnings wave
weakref zipfile zipimport
""".split()


def main() -> None:
    lib = sysconfig.get_paths()["stdlib"]
    docs = []
    for m in MODULES:
        with open(os.path.join(lib, m + ".py"), encoding="utf-8") as f:
            docs.append(f"# Python standard library: {m.replace('/__init__', '')}.py\n" + f.read())
    text = "\f".join(docs)
    out = os.path.join(os.path.dirname(__file__), "..", "lorafast", "data", "stdlib.txt.gz")
    with gzip.GzipFile(out, "wb", mtime=0) as f:
        f.write(text.encode("utf-8"))
    print(f"{len(docs)} documents, {len(text.encode()):,} bytes -> {out} ({os.path.getsize(out):,} bytes)")


if __name__ == "__main__":
    main()
