"""The supervisor–handler contract: run-directory names, signals, status documents.

The supervisor imports only this package and ``config``, so it never loads data-plane code.
"""
