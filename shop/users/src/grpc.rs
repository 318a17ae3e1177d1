//! gRPC `Users`: what other services ask about users.

use axum::Router;
use shop_contracts::proto::users_server::{Users, UsersServer};
use shop_contracts::proto::{GetUserRequest, User};
use tonic::{Request, Response, Status};

use crate::State;
use crate::store;

/// Longest id looked up (ids are 36-character UUIDs).
const ID_BYTES_MAX: usize = 64;

#[derive(Debug)]
struct UsersService {
    state: State,
}

#[tonic::async_trait]
impl Users for UsersService {
    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() || id.len() > ID_BYTES_MAX {
            return Err(Status::invalid_argument("id must be a user id"));
        }
        let user = store::find_by_id(&self.state.db, &id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "GetUser failed");
                Status::unavailable("the users database did not answer")
            })?
            .ok_or_else(|| Status::not_found(format!("no user {id}")))?;
        Ok(Response::new(User {
            id: user.id,
            email: user.email,
            name: user.name,
            role: user.role,
        }))
    }
}

pub(crate) fn router(state: State) -> Router {
    tonic::service::Routes::new(UsersServer::new(UsersService { state })).into_axum_router()
}
