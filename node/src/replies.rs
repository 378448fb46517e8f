//! Sending a job's one answer where its sender asked for it: JSON (with the MQTT 5 correlation
//! data) for a raw image, protobuf for a `Job`; see [`isomesh_mesh::request::ReplyRoute`].

use isomesh_mesh::report;
use isomesh_mesh::request::ReplyRoute;
use isomesh_protos::JobResult;
use prost::Message;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;

/// The payload and properties of the answer `result` on `route`.
fn encode_reply(route: &ReplyRoute, result: &JobResult) -> (Vec<u8>, Option<PublishProperties>) {
    match route {
        ReplyRoute::Json { .. } => {
            let props = (!result.correlation.is_empty()).then(|| PublishProperties {
                correlation_data: Some(result.correlation.clone().into()),
                content_type: Some("application/json".into()),
                ..Default::default()
            });
            (report::to_json(result).to_string().into_bytes(), props)
        }
        ReplyRoute::Proto { .. } => (result.encode_to_vec(), None),
    }
}

/// Publishes the answer of a job task, waiting for room in the client's queue.
pub async fn publish_reply(client: &AsyncClient, route: &ReplyRoute, result: &JobResult) {
    let (payload, props) = encode_reply(route, result);
    let sent = match props {
        Some(props) => {
            client
                .publish_with_properties(route.topic(), QoS::AtLeastOnce, false, payload, props)
                .await
        }
        None => {
            client
                .publish(route.topic(), QoS::AtLeastOnce, false, payload)
                .await
        }
    };
    if let Err(e) = sent {
        tracing::error!(topic = route.topic(), error = %e, "cannot publish a result");
    }
}
