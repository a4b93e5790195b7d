"""Two benchmark jobs taking turns step by step (imports nothing of fem_moe: an older
checkout's script can load it by path)."""
import os
import time


class Turns:
    """Two jobs taking turns step by step (``--turns DIR:me:other``), so that a machine whose
    speed drifts over minutes (ours did, by up to 1.6x between runs) times both alike: before
    each step every rank waits until the file DIR/turn names its job, and after it the job
    hands the turn over. A job that has finished leaves DIR/done_<name>; the other then keeps
    the turn. Every rank polls the file (an MPI barrier would spin while the other job
    computes). Write the first job's name into DIR/turn, then start both."""

    def __init__(self, spec, comm):
        self.dir, self.me, self.other = spec.split(":")
        self.comm = comm

    def _path(self, name):
        return os.path.join(self.dir, name)

    def wait(self):
        while not os.path.exists(self._path("done_" + self.other)):
            try:
                with open(self._path("turn")) as f:
                    if f.read().strip() == self.me:
                        return
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    def hand_over(self, done=False):
        """Collective. The file names the other job before any rank of this one returns: a rank
        that read its own name again would start the next step and spin in its first
        collective while the other job computes."""
        self.comm.Barrier()
        if self.comm.rank == 0:
            if done:
                open(self._path("done_" + self.me), "w").close()
            tmp = self._path(f"turn.{self.me}")
            with open(tmp, "w") as f:
                f.write(self.other)
            os.replace(tmp, self._path("turn"))
        self.comm.Barrier()
