//! Local admin HTTP endpoint: `GET /status` returns the status document as JSON.

use super::expose::StackEvent;
use super::Shared;
use axum::{extract::State, routing::get, Json, Router};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    stack: mpsc::Sender<StackEvent>,
}

pub async fn run(
    shared: Arc<Shared>,
    stack: mpsc::Sender<StackEvent>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new().route("/status", get(status)).with_state(AppState { shared, stack });
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = shutdown.changed().await;
    });
    if let Err(e) = serve.await {
        tracing::error!("admin endpoint: {e}");
    }
}

async fn status(State(st): State<AppState>) -> Result<Json<crate::status::StatusDoc>, (axum::http::StatusCode, String)> {
    let (tx, rx) = oneshot::channel();
    let unavailable = || (axum::http::StatusCode::SERVICE_UNAVAILABLE, "stack not running\n".to_string());
    st.stack.send(StackEvent::Snapshot(tx)).await.map_err(|_| unavailable())?;
    let snap = rx.await.map_err(|_| unavailable())?;
    Ok(Json(st.shared.status(snap)))
}
