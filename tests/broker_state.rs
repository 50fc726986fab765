//! What a session leaves in the broker core once it ends, asserted through the core's own API
//! on an in-process [`Server`]: a clean session leaves nothing; a persistent one keeps exactly its
//! subscriptions until a clean start discards them.

mod common;

use common::clients::V4Client;
use mqtt_adapter::{Config, Server};
use rumqttc::QoS;

async fn server() -> Server {
    let mut config = Config::defaults();
    config.host = "127.0.0.1".parse().expect("address");
    config.mqtt_port = 0;
    config.ws_port = 0;
    config.http_port = 0;
    config.publish_rate = 0;
    // Above the 2,000 subscriptions the first test makes (the default allows 1,000).
    config.max_subscriptions = 10_000;
    // The core's own memory is what is asserted; parallel servers share no data directory.
    config.state = mqtt_adapter::config::StateBackend::Memory;
    Server::start(&config).await.expect("server starts")
}

#[tokio::test]
async fn a_clean_session_with_many_subscriptions_leaves_nothing_behind() {
    let server = server().await;
    let port = server.mqtt_addr().port();
    let broker = server.broker();
    let mut client = V4Client::connect(port, "many", "demo-app", "demo-app-secret").await;
    let filters: Vec<(String, QoS)> = (0..2000)
        .map(|i| {
            (
                format!("m/demo-domain/c/demo-channel/t/{i}/#"),
                QoS::AtLeastOnce,
            )
        })
        .collect();
    for chunk in filters.chunks(200) {
        client
            .client
            .subscribe_many(
                chunk
                    .iter()
                    .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q)),
            )
            .await
            .expect("subscribe");
        client
            .wait_for(|e| match e {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => Some(()),
                _ => None,
            })
            .await;
    }
    assert_eq!(broker.subscription_count().0, 2000);
    assert_eq!(broker.session_count(), 1);
    client.disconnect().await;

    // A new connection under the same identity and client id waits for the old one to have
    // ended completely; by then the old state must be gone.
    let mut opts = common::clients::v4_options(port, "many", "demo-app", "demo-app-secret");
    opts.set_clean_session(false);
    let again = V4Client::connect_with(opts).await;
    assert!(!again.connack.session_present);
    assert_eq!(
        broker.subscription_count(),
        (0, 0),
        "no subscription or trie node left"
    );
    assert_eq!(broker.session_count(), 1, "only the new session");
    again.disconnect().await;
    assert!(server.shutdown().await);
}

#[tokio::test]
async fn a_persistent_session_keeps_its_subscriptions_until_a_clean_start() {
    let server = server().await;
    let port = server.mqtt_addr().port();
    let broker = server.broker();
    let persistent = || {
        let mut o = common::clients::v4_options(port, "keeper", "demo-app", "demo-app-secret");
        o.set_clean_session(false);
        o
    };
    let mut client = V4Client::connect_with(persistent()).await;
    client
        .subscribe("m/demo-domain/c/demo-channel/k", QoS::AtLeastOnce)
        .await;
    client.disconnect().await;
    let back = V4Client::connect_with(persistent()).await;
    assert!(back.connack.session_present);
    assert_eq!(broker.subscription_count().0, 1);
    back.disconnect().await;
    let clean = V4Client::connect(port, "keeper", "demo-app", "demo-app-secret").await;
    assert!(!clean.connack.session_present);
    assert_eq!(broker.subscription_count(), (0, 0));
    clean.disconnect().await;
    assert!(server.shutdown().await);
}
