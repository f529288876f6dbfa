//! Operator endpoints over HTTP (the Prometheus page, the dashboard): bound
//! to a loopback address, since they are not authenticated, and served in
//! the background for the life of the process.

use std::net::SocketAddr;

/// `flag ADDR` must name a loopback address.
pub fn loopback_only(addr: SocketAddr, flag: &str) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!("{flag} {addr}: this endpoint only listens on a loopback address, e.g. 127.0.0.1:{}", addr.port()))
    }
}

/// Binds `addr` and serves `app` in the background; returns the bound
/// address (port 0 picks one). `what` names it in logs.
pub async fn spawn(addr: SocketAddr, app: axum::Router, what: &'static str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the {what} stopped");
        }
    });
    Ok(bound)
}
