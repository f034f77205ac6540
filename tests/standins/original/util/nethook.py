def get_parameter(model, name):
    return dict(model.named_parameters())[name]
