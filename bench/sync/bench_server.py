"""The CPU normserve server the sync benchmarks run against."""
import subprocess


class BenchServer:
    """Starts `binary` on a free loopback port (`with` stops it)."""

    def __init__(self, binary):
        self.process = subprocess.Popen(
            [binary, "--address=127.0.0.1:0", "--device=cpu"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.address = None
        for line in self.process.stdout:
            if line.startswith("normserve listening on "):
                self.address = line.split()[3]
                break
        if self.address is None:
            self.process.kill()
            raise RuntimeError(f"{binary} did not start")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(30)
