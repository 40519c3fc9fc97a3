"""The file service (learnmesh.file.v1.FileService): uploads, downloads and their bytes.

``storage`` holds the bytes (a local directory or an S3 bucket).
"""
