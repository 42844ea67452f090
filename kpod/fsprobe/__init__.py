"""Measure pods' mounts where a hung one costs only itself: statfs in a worker process.

statvfs() on a FUSE mount whose server never answers, or on an NFS mount whose server is gone,
blocks in the kernel: fs/fuse/dev.c request_wait_answer() waits interruptibly, then killably
while the request is still queued, and once the server has read it (FR_SENT) in wait_event(),
uninterruptibly, until the server answers or the connection is aborted.  A thread of the agent
stuck there stalled every pod's filesystem series, and the agent could not exit (a process is
not reaped while one of its threads is in uninterruptible sleep; SIGKILL waits too).  So no
thread of the agent makes that call, nor any other that can reach a pod's filesystem (path
lookups, stat): they all run in a worker process (worker.py), and the agent only exchanges
fixed-size messages with it (protocol.py) under deadlines (client.py):

  * a probe that passes its deadline is answered "stuck" by the worker itself; its thread is
    abandoned (it answers "late" if the call ever returns) and another one takes the queue;
  * a stuck mount is not probed again while its probe is still pending, and after its late
    answer only after a backoff; its series are dropped, counted, and listed in /debug/status;
  * a pod has at most `max_stuck_per_pod` stuck probes (each holds one worker thread); its
    further mounts are not probed meanwhile.  The worker holds at most `MAX_LANES` threads;
  * the agent never waits for the worker: at shutdown it closes the pipe and kills it, and its
    own exit does not depend on the worker's.
"""
