//! Every backend runs the same conformance suite.

mod memory {
    trellis_eventstore::conformance_tests!(async {
        Some((trellis_eventstore::MemoryStore::new(), ()))
    });
}

mod sqlite {
    async fn open() -> Option<(trellis_eventstore::SqliteStore, tempfile::TempDir)> {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("events.db").display());
        let store = trellis_eventstore::SqliteStore::open(&url)
            .await
            .expect("open sqlite store");
        Some((store, dir))
    }
    trellis_eventstore::conformance_tests!(open());

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn read_all_never_skips_with_four_store_instances_on_one_file() {
        // Four independent stores (as four processes would be) append to one file while a
        // fifth reads the log.
        let (reader, dir) = open().await.expect("sqlite always works");
        let url = format!("sqlite://{}", dir.path().join("events.db").display());
        let mut writers = Vec::new();
        for _ in 0..4 {
            writers.push(
                trellis_eventstore::SqliteStore::open(&url)
                    .await
                    .expect("open"),
            );
        }
        trellis_eventstore::testkit::read_all_never_skips_with(writers, reader).await;
    }
}

mod postgres {
    async fn open() -> Option<(
        trellis_eventstore::PostgresStore,
        trellis_testkit::TestPostgres,
    )> {
        let db = trellis_testkit::postgres("eventstore_conformance").await?;
        let store = trellis_eventstore::PostgresStore::open(&db.url)
            .await
            .expect("open postgres store");
        Some((store, db))
    }
    trellis_eventstore::conformance_tests!(open());

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn read_all_never_skips_with_four_store_instances_on_one_database() {
        // Four independent stores (each with its own pool and writer, as separate processes
        // would have) append concurrently while a fifth reads the log: the advisory lock keeps
        // positions in commit order.
        let Some((reader, db)) = open().await else {
            return;
        };
        let mut writers = Vec::new();
        for _ in 0..4 {
            writers.push(
                trellis_eventstore::PostgresStore::open(&db.url)
                    .await
                    .expect("open"),
            );
        }
        trellis_eventstore::testkit::read_all_never_skips_with(writers, reader).await;
    }
}
