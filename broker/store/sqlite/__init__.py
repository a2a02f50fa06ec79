"""History in an SQLite database: the default, durable store (``SqliteStore``).

One job per module:

    files       the data directory's lock, the database file's identity (deleted or
                replaced while running), the history mark (the seqs given, kept outside
                the database), the boot id, a storage error's one-line cause
    database    the schema, the connections, every SQL write (commits, history bound,
                retention, seq reservation, WAL fsync and checkpoints)
    commitlog   the commit log on disk: records and segments, torn and damaged ones
    syncer      the commit log at run time: its tail (what SQLite does not hold yet)
                and the fsync thread that makes it durable and applies it
    reads       history reads and replay pages, on the reader thread
    store       ``SqliteStore``: composes them, numbers publishes, tracks failures, and
                at open tells a history that went back (restored, replaced, damaged)
                and starts a new epoch above every seq seen

Which thread owns what (a publish's path never waits for SQLite):

    event loop      ``SqliteStore`` itself: ``epoch``, ``last_seq``, the seq reservation
                    and the failure state; appends (``Syncer.add``: the log's ``write``
                    and the tail, under ``tail_lock``); ``FileWatch.check`` and
                    ``DirectoryLock.check``; key lookups
                    (``Syncer.live_key``, then ``Database.known_key`` on its own
                    connection); the ``fsync = always`` waiters, woken by the fsync
                    thread through ``call_soon_threadsafe``.
    fsync thread    ``Syncer._run`` (a thread of its own, below the loop's priority):
                    fsyncs the current segment (``fsync = always``) and applies the tail
                    every ``fsync_interval``: ``Syncer.apply`` rotates the log, commits
                    through ``Database`` (writer connection, under ``write_lock``), fsyncs
                    and checkpoints the WAL (checkpoint connection, under ``write_lock``),
                    then rewrites the history mark (``MarkFile``).
                    Its failures go to the store's failure state.
    writer          a pool of one thread: open (``DirectoryLock``, ``check_database``,
                    ``Database.open``, ``Syncer.recover``), ``Syncer.apply`` when a read or
                    a failing store needs it now, retention (``Database.trim``), close.
                    ``apply_lock`` keeps it and the fsync thread from applying at once.
    reader pool     a pool of one thread with its own connection: everything in
                    ``Reads`` and its pages, so that a replay never waits for a commit.
"""

from broker.store.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
