"""MoLTransformer2DModel: a diffusion transformer whose depth is a routed walk through a block pool."""

import logging
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange
import torch.nn.functional as F
from torch import nn

from .blocks import FinalLayer, MoLBlock
from .dispatch import dispatch_samples, dispatch_tokens, scale_update
from .layer_router import (
    ROUTER_CONDITIONS,
    ROUTER_GRANULARITIES,
    ROUTER_INPUTS,
    ROUTER_MODES,
    ROUTER_NOISES,
    ROUTER_TRANSFORMS,
    LayerRouter,
    RouteDecision,
    RouteTrace,
    router_aux_losses,
)
from .route_table import RouteTable, check_route_table, tabulate_routes

logger = logging.getLogger(__name__)

TIMESTEP_FREQUENCY_CHANNELS = 256


@dataclass
class MoLTransformer2DModelOutput(BaseOutput):
    """Output of [`MoLTransformer2DModel`].

    Args:
        sample (`torch.Tensor` of shape `(B, out_channels, H, W)`): The model prediction.
        aux_loss (`torch.Tensor`): Scalar router loss, `router_balance_loss_weight * balance_loss +
            router_z_loss_weight * z_loss`; zero for fixed routing modes.
        balance_loss (`torch.Tensor`): Unweighted load-balance loss over all routing decisions (1 is balanced).
        z_loss (`torch.Tensor`): Unweighted router z-loss.
        routes (`RouteTrace`, *optional*): The routes taken; only when `return_routes=True`.
    """

    sample: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None
    balance_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    routes: Optional[RouteTrace] = None


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")


def _check_number(name: str, value, minimum: float, allow_equal: bool = True) -> None:
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if valid:
        valid = value >= minimum if allow_equal else value > minimum
    if not valid:
        bound = ">=" if allow_equal else ">"
        raise ValueError(f"`{name}` must be a number {bound} {minimum}, got {value!r}.")


class MoLTransformer2DModel(ModelMixin, ConfigMixin):
    """Mixture-of-Layers diffusion transformer for images or latents.

    The image is cut into patch tokens. A [`LayerRouter`] then walks the tokens through
    `num_routing_steps` (S) applications of blocks drawn from a shared pool of `num_pool_blocks`
    (K) adaLN-Zero transformer blocks, in any order and with repeats. Compute per forward is S
    blocks, parameters are K blocks. Conditioning (timestep embedding plus class embedding) is
    computed once per forward; each block application also adds a learned embedding of its routing
    step, so a shared block knows where in the walk it is.

    Args:
        sample_size (`int`): Height and width of the input in pixels (or latent pixels).
        patch_size (`int`): Side of a square patch; must divide `sample_size`.
        in_channels (`int`): Input channels.
        out_channels (`int`, *optional*): Output channels; `None` means `in_channels`. Use
            `2 * in_channels` for learned variance (`DDPMScheduler(variance_type="learned_range")`).
        num_attention_heads (`int`): Attention heads per block.
        attention_head_dim (`int`): Width of one head; the model width D is heads x head dim.
        num_pool_blocks (`int`): K, the number of shared blocks.
        num_routing_steps (`int`): S, the number of block applications per forward pass.
        num_classes (`int`, *optional*): Number of classes for class conditioning; `None` for an
            unconditional model. Labels outside `[0, num_classes)` select a learned null class, the
            unconditional branch of classifier-free guidance (so `DiTPipeline`'s label 1000 works).
        mlp_ratio (`float`): MLP hidden width as a multiple of D.
        router_granularity (`str`): `"sample"` (one block per image per step) or `"token"` (one
            block per patch token per step, attention over all tokens).
        router_condition (`str`): What the router sees besides the activations: `"step"` (the
            routing step), `"timestep"` (the diffusion conditioning vector, timestep plus class)
            or `"step_and_timestep"`.
        router_input (`str`): `"activations"` or `"none"`; with `"none"` routes depend only on
            routing step, timestep and class, so they can be tabulated per timestep.
        router_mode (`str`): `"learned"`; `"cyclic"` (block s mod K, a universal-transformer style
            tied baseline); `"sequential"` (block s at step s, requires K == S: a plain DiT).
        router_transform (`str`): `"none"` or `"mlp"`, a residual MLP h(x, s) before each block.
        router_noise (`str`): `"none"`, `"gumbel"` or `"jitter"`; exploration noise in training only.
        router_noise_scale (`float`): Gumbel noise scale, or the jitter epsilon (in (0, 1)).
        router_hidden_size (`int`): Width of the router MLP.
        router_balance_loss_weight (`float`): Weight of the load-balance loss in `aux_loss`.
        router_z_loss_weight (`float`): Weight of the router z-loss in `aux_loss`.
        long_skip (`bool`): U-ViT style long skips: the input of step s is concatenated to the
            input of step S-1-s for the second half of the walk and projected back to D.
        final_conv (`bool`): A residual 3x3 convolution after unpatchifying (as U-ViT uses a 3x3
            convolution), which smooths patch seams.
        conv_channels (`int`, *optional*): Width of a full-resolution convolutional stem and head;
            `None` for none. The stem (two 3x3 convolutions) feeds the patch embedding; the head takes
            the unpatchified transformer output together with the stem features (a U-Net style skip)
            through two 3x3 convolutions. They add local image structure at a cost of about
            `4 * 9 * conv_channels**2` multiply-adds per pixel, small next to the transformer.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        num_pool_blocks: int = 4,
        num_routing_steps: int = 8,
        num_classes: Optional[int] = None,
        mlp_ratio: float = 4.0,
        router_granularity: str = "sample",
        router_condition: str = "step_and_timestep",
        router_input: str = "activations",
        router_mode: str = "learned",
        router_transform: str = "none",
        router_noise: str = "none",
        router_noise_scale: float = 1.0,
        router_hidden_size: int = 64,
        router_balance_loss_weight: float = 0.01,
        router_z_loss_weight: float = 0.001,
        long_skip: bool = False,
        final_conv: bool = False,
        conv_channels: Optional[int] = None,
    ):
        super().__init__()
        self._validate_config()
        out_channels = in_channels if out_channels is None else out_channels
        # Store the resolved value: DiTPipeline reads `config.out_channels // 2` and fails on None.
        self.register_to_config(out_channels=out_channels)
        hidden_size = num_attention_heads * attention_head_dim
        self.gradient_checkpointing = False
        self._route_table: Optional[RouteTable] = None  # set by set_route_table; never saved

        # 1. Input: optional convolutional stem, then patch embedding with fixed 2D sin-cos positions.
        if conv_channels is not None:
            self.conv_stem = nn.Sequential(
                nn.Conv2d(in_channels, conv_channels, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(conv_channels, conv_channels, 3, padding=1),
            )
        else:
            self.conv_stem = None
        self.patch_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels if conv_channels is None else conv_channels,
            embed_dim=hidden_size,
            pos_embed_type="sincos",
        )

        # 2. Conditioning: timestep, optional class with a null row, and the routing step.
        self.time_proj = Timesteps(TIMESTEP_FREQUENCY_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(TIMESTEP_FREQUENCY_CHANNELS, hidden_size)
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_size) if num_classes is not None else None
        self.step_embedding = nn.Embedding(num_routing_steps, hidden_size)

        # 3. Routing: the shared pool and the router.
        self.blocks = nn.ModuleList(
            MoLBlock(hidden_size, num_attention_heads, mlp_ratio) for _ in range(num_pool_blocks)
        )
        self.router = LayerRouter(
            hidden_size=hidden_size,
            num_blocks=num_pool_blocks,
            num_steps=num_routing_steps,
            granularity=router_granularity,
            condition=router_condition,
            router_input=router_input,
            mode=router_mode,
            transform=router_transform,
            noise=router_noise,
            noise_scale=router_noise_scale,
            router_hidden_size=router_hidden_size,
        )
        num_skips = num_routing_steps // 2 if long_skip else 0
        self.skip_projections = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(num_skips))

        # 4. Output.
        head_channels = out_channels if conv_channels is None else conv_channels
        self.final_layer = FinalLayer(hidden_size, patch_size, head_channels)
        self.conv_head = ConvHead(conv_channels, out_channels, hidden_size) if conv_channels is not None else None
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1) if final_conv else None

        self.initialize_weights()

    def _validate_config(self) -> None:
        config = self.config
        for name in ("sample_size", "patch_size", "in_channels", "num_attention_heads", "attention_head_dim"):
            _check_int(name, config[name], 1)
        for name in ("num_pool_blocks", "num_routing_steps", "router_hidden_size"):
            _check_int(name, config[name], 1)
        if config.out_channels is not None:
            _check_int("out_channels", config.out_channels, 1)
        if config.num_classes is not None:
            _check_int("num_classes", config.num_classes, 1)
        if config.conv_channels is not None:
            _check_int("conv_channels", config.conv_channels, 1)
        if config.sample_size % config.patch_size != 0:
            raise ValueError(
                f"`patch_size` ({config.patch_size}) must divide `sample_size` ({config.sample_size}); "
                f"choose a patch size among the divisors of {config.sample_size}."
            )
        _check_number("mlp_ratio", config.mlp_ratio, 0, allow_equal=False)
        _check_choice("router_granularity", config.router_granularity, ROUTER_GRANULARITIES)
        _check_choice("router_condition", config.router_condition, ROUTER_CONDITIONS)
        _check_choice("router_input", config.router_input, ROUTER_INPUTS)
        _check_choice("router_mode", config.router_mode, ROUTER_MODES)
        _check_choice("router_transform", config.router_transform, ROUTER_TRANSFORMS)
        _check_choice("router_noise", config.router_noise, ROUTER_NOISES)
        _check_number("router_noise_scale", config.router_noise_scale, 0, allow_equal=False)
        if config.router_noise == "jitter" and config.router_noise_scale >= 1:
            raise ValueError(
                f"`router_noise_scale` must be in (0, 1) for jitter noise, got {config.router_noise_scale!r}."
            )
        _check_number("router_balance_loss_weight", config.router_balance_loss_weight, 0)
        _check_number("router_z_loss_weight", config.router_z_loss_weight, 0)
        for name in ("long_skip", "final_conv"):
            if not isinstance(config[name], bool):
                raise ValueError(f"`{name}` must be true or false, got {config[name]!r}.")
        if config.router_mode == "sequential" and config.num_pool_blocks != config.num_routing_steps:
            raise ValueError(
                f"router_mode='sequential' applies block s at step s, so `num_pool_blocks` "
                f"({config.num_pool_blocks}) must equal `num_routing_steps` ({config.num_routing_steps}); "
                f"use router_mode='cyclic' to reuse fewer blocks."
            )
        if config.router_granularity == "token" and config.router_input == "none":
            raise ValueError(
                "router_input='none' gives every token of an image the same route, so "
                "router_granularity='token' has nothing to choose per token; use router_granularity='sample'."
            )
        if config.router_mode != "learned":
            defaults = {"router_granularity": "sample", "router_input": "activations", "router_noise": "none"}
            ignored = [f"{name}={config[name]!r}" for name, default in defaults.items() if config[name] != default]
            if ignored:
                logger.warning(
                    "router_mode=%r follows a fixed order without a router, so %s has no effect.",
                    config.router_mode, ", ".join(ignored),
                )
        if config.router_mode == "learned" and config.router_input == "none" and config.router_condition == "timestep":
            logger.warning(
                "router_input='none' with router_condition='timestep' gives the router neither the activations "
                "nor the routing step, so it picks the same block at all %d routing steps for a given timestep "
                "and class. Use router_condition='step_and_timestep' for a route that changes between steps.",
                config.num_routing_steps,
            )

    def initialize_weights(self) -> None:
        """Initialise all weights explicitly.

        Linear layers are Xavier-uniform with zero bias and the patch projection is Xavier on its
        flattened kernel (as DiT). Every block's adaLN modulation and the final layer start at zero,
        so each block is the identity and the model predicts zero until training moves them. This
        keeps a deep routed walk stable at initialisation. The router starts with small random
        output weights (see `LayerRouter.initialize_weights`).
        """
        kernel = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(kernel.view(kernel.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        # The conditioning vector starts at about unit scale: the timestep MLP keeps PyTorch's default
        # Linear init and class embeddings are N(0, 1). With DiT's std-0.02 init, silu(cond) is ~0.01,
        # so under Adam the adaLN weights that read it move the output ~50x slower than the adaLN
        # biases, and short runs learned to ignore the class label.
        self.time_embedding.linear_1.reset_parameters()
        self.time_embedding.linear_2.reset_parameters()
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=1.0)
        nn.init.normal_(self.step_embedding.weight, std=0.02)
        for block in self.blocks:
            block.initialize_weights()
        self.router.initialize_weights()
        # Long-skip projections start as [I | 0] (keep x, ignore the skip) and the output
        # convolution as a zero residual, so both options leave a fresh model unchanged and the
        # identity path of the walk intact; a random projection would scramble it.
        hidden_size = self.config.num_attention_heads * self.config.attention_head_dim
        for projection in self.skip_projections:
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)
            with torch.no_grad():
                projection.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
        if self.conv_out is not None:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        if self.conv_head is not None:
            self.conv_head.initialize_weights()
        self.final_layer.initialize_weights()

    @property
    def null_class_label(self) -> Optional[int]:
        """Label of the learned null class (equal to `num_classes`); `None` for an unconditional model."""
        return self.config.num_classes

    def tabulate_routes(
        self, timesteps: Union[torch.Tensor, list], class_labels: Optional[list[int]] = None
    ) -> RouteTable:
        """Compute the routes for every timestep and class, for a model whose routes ignore the activations.

        Routes can be tabulated when `router_input="none"` or the routing mode is fixed (`"cyclic"`,
        `"sequential"`). Routing noise is left out, as in eval mode. Install the result with
        [`set_route_table`] to skip the router while sampling, e.g.:

        ```py
        >>> pipe.scheduler.set_timesteps(50)
        >>> pipe.transformer.set_route_table(pipe.transformer.tabulate_routes(pipe.scheduler.timesteps))
        >>> images = pipe(class_labels=[3, 7], num_inference_steps=50).images
        ```

        Args:
            timesteps (`torch.Tensor` or `list`): Diffusion timesteps to tabulate, e.g. `scheduler.timesteps`
                after `scheduler.set_timesteps`. A forward pass later matches them exactly.
            class_labels (`list[int]`, *optional*): Classes to tabulate for a class-conditional model;
                all classes by default. The null class is always included.

        Returns:
            [`RouteTable`] with indices of shape (N timesteps, C labels, S routing steps).

        Raises:
            ValueError: When the model routes on the activations (`router_mode="learned"` with
                `router_input="activations"`), since its routes then differ from image to image.
        """
        return tabulate_routes(self, timesteps, class_labels)

    def set_route_table(self, table: RouteTable) -> None:
        """Read routes from `table` in every following forward pass instead of running the router.

        The model must be in eval mode while a table is set. Outputs equal those of the router, and
        a routing step at which every sample of the batch takes the same block is a single block call.
        """
        check_route_table(self, table)
        self._route_table = table

    def clear_route_table(self) -> None:
        """Remove the route table, so that the router chooses the routes again."""
        self._route_table = None

    @property
    def route_table(self) -> Optional[RouteTable]:
        """The route table in use, or `None`."""
        return self._route_table

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[torch.Tensor, float, int, None] = None,
        class_labels: Optional[torch.LongTensor] = None,
        return_dict: bool = True,
        return_routes: bool = False,
    ) -> Union[MoLTransformer2DModelOutput, tuple]:
        """Predict noise (or the configured target) for a batch of noisy images.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, in_channels, H, W)`): Noisy input with B >= 1,
                in the dtype of the model weights unless autocast is on. H and W must be multiples of
                `patch_size`, and they may differ from `sample_size` and from each other. As in
                diffusers' DiT, the sin-cos position embedding is then recomputed for the new token
                grid, with positions scaled to the range of the `sample_size` grid.
            timestep (`torch.Tensor`, `int` or `float`): Diffusion timestep: a number, a 0-d tensor,
                or a tensor of shape (1,) or (B,).
            class_labels (`torch.LongTensor` of shape `(B,)`, *optional*): Class labels for a
                class-conditional model; labels outside `[0, num_classes)` and `None` mean the null class.
            return_dict (`bool`): Return a [`MoLTransformer2DModelOutput`] rather than a tuple.
            return_routes (`bool`): Also return the [`RouteTrace`] of this forward pass.

        Returns:
            [`MoLTransformer2DModelOutput`] or a tuple whose first element is the sample
            `(B, out_channels, H, W)`.
        """
        batch_size, height, width = self._check_inputs(hidden_states, timestep, class_labels)
        timesteps = self._broadcast_timestep(timestep, batch_size, hidden_states.device)
        labels = self._map_class_labels(class_labels, batch_size, hidden_states.device)

        # 1. Input: optional conv stem, then patchify and embed, (B, C, H, W) -> (B, T, D).
        stem = self.conv_stem(hidden_states) if self.conv_stem is not None else None  # (B, C_conv, H, W)
        x = self.patch_embed(hidden_states if stem is None else stem)

        # 2. Conditioning, computed once and shared by every block application: (B, D).
        cond = self._conditioning(timesteps, labels, x.dtype)

        # 3. Routed walk through the pool, with routes read from the route table when one is set.
        planned = self._planned_decisions(timesteps, labels)
        x, decisions = self._route(x, cond, planned)

        # 4. Output: final adaLN layer and unpatchify, (B, T, D) -> (B, C_out, H, W), through the
        # conv head when there is one.
        x = self.final_layer(x, cond)  # (B, T, p*p*C_out), or p*p*C_conv with a conv head
        patch = self.config.patch_size
        sample = rearrange(
            x, "b (h w) (p q c) -> b c (h p) (w q)", h=height // patch, w=width // patch, p=patch, q=patch
        )
        if self.conv_head is not None:
            sample = self.conv_head(sample, stem, cond)  # (B, C_out, H, W)
        if self.conv_out is not None:
            sample = sample + self.conv_out(sample)

        # 5. Router losses over all decisions of this pass, and the optional trace.
        balance_loss, z_loss = router_aux_losses(decisions, self.config.num_pool_blocks)
        aux_loss = (
            self.config.router_balance_loss_weight * balance_loss + self.config.router_z_loss_weight * z_loss
        )
        routes = self._trace(decisions, timesteps, labels) if return_routes else None

        output = MoLTransformer2DModelOutput(
            sample=sample, aux_loss=aux_loss, balance_loss=balance_loss, z_loss=z_loss, routes=routes
        )
        return output if return_dict else output.to_tuple()

    def _conditioning(self, timesteps: torch.Tensor, labels, dtype: torch.dtype) -> torch.Tensor:
        """Embed the timesteps (B,) and the mapped labels (B,) or None into the conditioning vector (B, D)."""
        cond = self.time_embedding(self.time_proj(timesteps).to(dtype=dtype))
        if self.class_embedding is not None:
            cond = cond + self.class_embedding(labels)
        return cond

    def _route(
        self, x: torch.Tensor, cond: torch.Tensor, planned: Optional[list[RouteDecision]] = None
    ) -> tuple[torch.Tensor, list[RouteDecision]]:
        """Run the S routing steps: (B, T, D) -> (B, T, D), with the decision of each step.

        `planned` contains one decision per step from a route table, and then the router is not called.
        """
        num_steps = self.config.num_routing_steps
        decisions = []
        skips = []
        for step in range(num_steps):
            mirror = num_steps - 1 - step
            if self.skip_projections and mirror < len(self.skip_projections):
                x = self.skip_projections[mirror](torch.cat([x, skips[mirror]], dim=-1))  # (B, T, D)

            decision = planned[step] if planned is not None else self.router(x, step, cond)
            decisions.append(decision)
            if self.router.transform is not None:
                x = self.router.transform(x, step)

            if step < len(self.skip_projections):
                skips.append(x)
            block_cond = cond + self.step_embedding.weight[step]  # (B, D)
            if decision.shared_block is not None:
                x_new = self._run_block(decision.shared_block, x, block_cond)  # whole batch, no grouping
            else:
                x_new = self._dispatch(decision.indices, x, block_cond)
            x = scale_update(x, x_new, decision.chosen_probs()) if decision.is_learned else x_new
        return x, decisions

    def _planned_decisions(self, timesteps: torch.Tensor, labels) -> Optional[list[RouteDecision]]:
        if self._route_table is None:
            return None
        if self.training:
            raise RuntimeError(
                "a route table is set but the model is in training mode, where the router must learn; "
                "call model.clear_route_table() before training, or model.eval() to sample."
            )
        return self._route_table.decisions(timesteps, labels, timesteps.device)

    def _dispatch(self, indices: torch.LongTensor, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.config.router_granularity == "sample":
            return dispatch_samples(self._run_block, len(self.blocks), indices, x, cond)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(self._dispatch_tokens, indices, x, cond)
        return self._dispatch_tokens(indices, x, cond)

    def _dispatch_tokens(self, indices: torch.LongTensor, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return dispatch_tokens(self.blocks, indices, x, cond)

    def _run_block(self, block_index: int, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        block = self.blocks[block_index]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, x, cond)
        return block(x, cond)

    def _trace(self, decisions: list[RouteDecision], timesteps: torch.Tensor, labels) -> RouteTrace:
        return RouteTrace(
            indices=torch.stack([d.indices for d in decisions]),  # (S, B) or (S, B, T)
            probs=torch.stack([d.probs.detach() for d in decisions]),  # (S, B, K) or (S, B, T, K)
            timesteps=timesteps.detach(),
            class_labels=labels,
            num_blocks=self.config.num_pool_blocks,
        )

    # Input checks and normalisation. They read shapes and dtypes only, never tensor values,
    # so they cost no device synchronisation. Measured on the demo-size model (sample_size 16,
    # patch 2, 4 heads x 32, K=4, S=6, 10 classes, batch 128, no_grad, 1 CPU thread on a shared
    # 2-core machine): `_check_inputs` takes about 10 us per call (timeit), while the no_grad
    # forward has a median of 1.09 s with the checks and 1.07 s with them patched out (60 runs
    # each, interleaved). The gap is run-to-run noise from the shared cores, about 1000x the cost
    # of the checks.

    def _check_inputs(self, hidden_states, timestep, class_labels) -> tuple[int, int, int]:
        config = self.config
        if not torch.is_tensor(hidden_states):
            raise TypeError(f"`hidden_states` must be a torch.Tensor, got {type(hidden_states).__name__}.")
        if hidden_states.dim() != 4:
            raise ValueError(
                f"`hidden_states` must have shape (batch, {config.in_channels}, height, width), "
                f"got shape {tuple(hidden_states.shape)}."
            )
        if not hidden_states.is_floating_point():
            raise TypeError(f"`hidden_states` must be a floating-point tensor, got dtype {hidden_states.dtype}.")
        weight_dtype = self.patch_embed.proj.weight.dtype
        if hidden_states.dtype != weight_dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            raise TypeError(
                f"`hidden_states` has dtype {hidden_states.dtype} but the model weights are {weight_dtype}; "
                f"cast the input with `.to({weight_dtype})`, or run the model under torch.autocast."
            )

        batch_size, channels, height, width = hidden_states.shape
        if batch_size == 0:
            raise ValueError(
                f"`hidden_states` has batch size 0 (shape {tuple(hidden_states.shape)}); pass at least one image."
            )
        if channels != config.in_channels:
            raise ValueError(
                f"`hidden_states` has {channels} channels but the model expects in_channels={config.in_channels}."
            )
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(
                f"`hidden_states` size {height}x{width} is not a multiple of patch_size={config.patch_size}; "
                f"resize or pad it to a multiple of {config.patch_size}, such as the trained size "
                f"{config.sample_size}x{config.sample_size}."
            )

        if timestep is None:
            raise ValueError("`timestep` is required: pass the diffusion timestep as a number or tensor.")
        if torch.is_tensor(timestep):
            if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch_size)):
                raise ValueError(
                    f"`timestep` must be a number, a 0-d tensor, or of shape (1,) or ({batch_size},); "
                    f"got shape {tuple(timestep.shape)}."
                )
            if timestep.dtype == torch.bool or timestep.is_complex():
                raise TypeError(f"`timestep` must be an integer or floating-point tensor, got {timestep.dtype}.")
        elif isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
            raise TypeError(f"`timestep` must be a number or a tensor, got {type(timestep).__name__}.")

        if class_labels is not None:
            self._check_class_labels(class_labels, batch_size)
        return batch_size, height, width

    def _check_class_labels(self, class_labels, batch_size: int) -> None:
        if self.config.num_classes is None:
            raise ValueError(
                "`class_labels` were given but the model is unconditional (num_classes=None); "
                "drop the labels or train a model with num_classes set."
            )
        if not torch.is_tensor(class_labels):
            raise TypeError(f"`class_labels` must be a LongTensor of shape ({batch_size},), got {type(class_labels).__name__}.")
        if class_labels.is_floating_point() or class_labels.dtype == torch.bool or class_labels.is_complex():
            raise TypeError(f"`class_labels` must be an integer tensor, got dtype {class_labels.dtype}.")
        if class_labels.dim() > 1 or (class_labels.dim() == 1 and class_labels.shape[0] not in (1, batch_size)):
            raise ValueError(
                f"`class_labels` must have shape ({batch_size},), got shape {tuple(class_labels.shape)}."
            )

    @staticmethod
    def _broadcast_timestep(timestep, batch_size: int, device: torch.device) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=device)
        return timestep.to(device).reshape(-1).expand(batch_size)  # (B,)

    def _map_class_labels(self, class_labels, batch_size: int, device: torch.device) -> Optional[torch.LongTensor]:
        num_classes = self.config.num_classes
        if num_classes is None:
            return None
        if class_labels is None:
            return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)
        labels = class_labels.to(device=device, dtype=torch.long).reshape(-1).expand(batch_size)
        in_range = (labels >= 0) & (labels < num_classes)
        return torch.where(in_range, labels, torch.full_like(labels, num_classes))  # (B,)


class ConvHead(nn.Module):
    """Convolutional output head: unpatchified features and stem features, FiLM-conditioned on `cond`.

    Two 3x3 convolutions, with a shift and scale from the conditioning vector between them (as a
    U-Net residual block reads its time embedding), so the full-resolution path also reads the
    timestep and class. The modulation and the last convolution start at zero.
    """

    def __init__(self, conv_channels: int, out_channels: int, cond_size: int):
        super().__init__()
        self.conv_in = nn.Conv2d(2 * conv_channels, conv_channels, 3, padding=1)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * conv_channels))
        self.conv_out = nn.Conv2d(conv_channels, out_channels, 3, padding=1)

    def initialize_weights(self) -> None:
        for layer in (self.modulation[-1], self.conv_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor, stem: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_in(torch.cat([features, stem], dim=1))  # (B, 2 C_conv, H, W) -> (B, C_conv, H, W)
        shift, scale = self.modulation(cond)[:, :, None, None].chunk(2, dim=1)  # (B, C_conv, 1, 1) each
        hidden = hidden * (1 + scale) + shift
        return self.conv_out(F.silu(hidden))  # (B, C_out, H, W)
