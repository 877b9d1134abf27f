//! One app cannot reach another's data through the capabilities, however it asks: a hostile
//! copy of the probe guest guesses the other app's object keys, upload ids, table and schema
//! names, registry entries and key ids, on both backend pairs, and the owner's data is intact
//! afterwards.

use blackbox::{AppCopy, AppHost, Backends, Services, unique_name};
use serde_json::json;

async fn a_hostile_app_reaches_nothing_of_another(backends: Backends) {
    let mut services = Services::start(backends);
    let owner = AppHost::start(&mut services, "probe", "owner", &[]);
    // The intruder shares the host's data directory, database and bucket with the owner.
    let data_dir = owner.host_data_dir().to_string_lossy().into_owned();
    let intruder_app = AppCopy::new("probe", &unique_name("intruder"));
    let intruder = AppHost::serve(&mut services, intruder_app, &["--data-dir", &data_dir]);
    let owner_name = owner.app.app.clone();

    // The owner's data: an object, an upload in progress, a table, a registry entry, a key.
    assert_eq!(
        owner
            .call("PUT", "/objects/put?key=secret", "owner's bytes")
            .await
            .0,
        200
    );
    let (_, created) = owner
        .call("POST", "/objects/multipart?key=pending", "")
        .await;
    let upload = created["upload_id"].as_str().unwrap().to_owned();
    assert_eq!(
        owner
            .call(
                "PUT",
                &format!("/objects/part?key=pending&upload_id={upload}&part=1"),
                "part"
            )
            .await
            .0,
        200
    );
    assert_eq!(
        owner
            .sql("execute", "CREATE TABLE secrets (v TEXT)", json!([]))
            .await
            .0,
        200
    );
    assert_eq!(
        owner
            .sql(
                "execute",
                "INSERT INTO secrets (v) VALUES ($1)",
                json!(["hidden"])
            )
            .await
            .0,
        200
    );
    let (_, key) = owner.call("GET", "/crypto/key", "").await;
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    assert_eq!(
        owner
            .call(
                "POST",
                &format!("/registry/begin?name=entry&key_id={key_id}"),
                ""
            )
            .await
            .0,
        200
    );
    assert_eq!(
        owner
            .call(
                "POST",
                "/registry/add-bytes?name=entry&part=1&etag=e",
                "data"
            )
            .await
            .0,
        200
    );

    // Objects: by the same key, by a path out of its own place, by listing, by the upload id.
    let (status, _) = intruder.call("GET", "/objects/get?key=secret", "").await;
    assert_eq!(status, 404);
    for key in [
        format!("../{owner_name}/objects/secret%2Eo"),
        format!("../../{owner_name}/secret"),
    ] {
        let (status, answer) = intruder
            .call("GET", &format!("/objects/get?key={key}"), "")
            .await;
        assert_eq!(status, 400, "{key}: {answer}");
    }
    let (_, listed) = intruder.call("GET", "/objects/list?prefix=", "").await;
    assert_eq!(listed, json!([]), "the intruder lists the owner's objects");
    let (status, _) = intruder
        .call(
            "GET",
            &format!("/objects/parts?key=pending&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(status, 404, "the intruder reads the owner's upload");
    let (status, _) = intruder
        .call(
            "PUT",
            &format!("/objects/part?key=pending&upload_id={upload}&part=1"),
            "the intruder's part, longer than the owner's",
        )
        .await;
    assert_eq!(status, 404, "the intruder writes into the owner's upload");
    let (status, _) = intruder
        .call(
            "POST",
            &format!("/objects/abort?key=pending&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(status, 404, "the intruder aborts the owner's upload");
    // Writing and deleting "secret" touches only the intruder's own object of that name.
    assert_eq!(
        intruder
            .call("PUT", "/objects/put?key=secret", "intruder's bytes")
            .await
            .0,
        200
    );
    assert_eq!(
        intruder
            .call("DELETE", "/objects/delete?key=secret", "")
            .await
            .0,
        200
    );

    // SQL: the same table name, the owner's schema or file by name, and lifting its rights.
    let (status, answer) = intruder
        .sql("query", "SELECT v FROM secrets", json!([]))
        .await;
    assert_eq!(status, 400, "{answer}");
    match backends {
        Backends::PostgresS3 => {
            let schema = format!("app_{owner_name}");
            for statement in [
                format!("SELECT v FROM {schema}.secrets"),
                "SELECT v FROM host_state.hmac_entries".to_owned(),
                "SET ROLE postgres".to_owned(),
                format!("DROP SCHEMA {schema} CASCADE"),
                "CREATE SCHEMA intruder_escape".to_owned(),
            ] {
                let (status, answer) = intruder.sql("execute", &statement, json!([])).await;
                assert_eq!(status, 400, "{statement}: {answer}");
                assert_eq!(answer["error"]["code"], "42501", "{statement}: {answer}");
            }
            let (_, rows) = intruder
                .sql(
                    "query",
                    "SELECT current_user::text, session_user::text",
                    json!([]),
                )
                .await;
            assert!(
                rows["rows"][0][0]
                    .as_str()
                    .unwrap()
                    .starts_with("host_app_intruder"),
                "{rows}"
            );
        }
        Backends::SqliteLocal => {
            let file = owner
                .host_data_dir()
                .join("apps")
                .join(&owner_name)
                .join("app.sqlite");
            for statement in ["ATTACH DATABASE $1 AS owner", "VACUUM INTO $1"] {
                let (status, answer) = intruder
                    .sql("execute", statement, json!([file.to_string_lossy()]))
                    .await;
                assert_eq!(status, 400, "{statement}: {answer}");
                assert!(
                    answer["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("not authorized")
                        || answer["error"]["message"]
                            .as_str()
                            .unwrap()
                            .contains("denied"),
                    "{answer}"
                );
            }
        }
    }

    // The registry: the owner's entry by name, and the owner's key id.
    let (status, _) = intruder.call("GET", "/registry/tag?name=entry", "").await;
    assert_eq!(status, 404);
    let (status, answer) = intruder
        .call(
            "POST",
            &format!("/registry/begin?name=taken&key_id={key_id}"),
            "",
        )
        .await;
    assert_eq!(
        status, 400,
        "the owner's key id works for the intruder: {answer}"
    );
    assert!(
        answer["error"].as_str().unwrap().contains("InvalidKey"),
        "{answer}"
    );
    assert_eq!(
        intruder
            .call("POST", "/registry/discard?name=entry", "")
            .await
            .0,
        200
    );

    // Everything of the owner's is as it was.
    let (status, bytes) = owner.bytes("GET", "/objects/get?key=secret", "").await;
    assert_eq!((status, bytes.as_slice()), (200, &b"owner's bytes"[..]));
    let (_, parts) = owner
        .call(
            "GET",
            &format!("/objects/parts?key=pending&upload_id={upload}"),
            "",
        )
        .await;
    assert_eq!(parts[0]["size"], 4, "{parts}");
    let (_, rows) = owner.sql("query", "SELECT v FROM secrets", json!([])).await;
    assert_eq!(rows["rows"], json!([["hidden"]]));
    let (status, recorded) = owner.call("GET", "/registry/parts?name=entry", "").await;
    assert_eq!(
        (status, recorded[0]["size"].as_u64()),
        (200, Some(4)),
        "{recorded}"
    );
}

#[tokio::test]
async fn a_hostile_app_reaches_nothing_of_another_sqlite_local() {
    a_hostile_app_reaches_nothing_of_another(Backends::SqliteLocal).await;
}

#[tokio::test]
async fn a_hostile_app_reaches_nothing_of_another_postgres_s3() {
    a_hostile_app_reaches_nothing_of_another(Backends::PostgresS3).await;
}
