from epp.cli import entrypoint

if __name__ == "__main__":  # not when multiprocessing's spawn imports it in a --workers child
    entrypoint()
